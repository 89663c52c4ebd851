"""Event fds: eventfd, timerfd, signalfd, epoll; and pidfds.

Readers parse what /proc/PID/fdinfo/N shows of each (the kernel prints eventfd
counts, epoll events and data in hex); makers create a new one in this process
(the restorer), which is then copied into the restored task. An epoll watch list
names fds by their number in the task, so it is rebuilt by epoll_ctl injected
there (add_epoll_watch), once every fd of the task exists.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import struct
import time

from checkpointer.kernel import proc
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import NR_pidfd_open, syscall

NR_timerfd_create = 283
NR_timerfd_settime = 286
NR_signalfd4 = 289
NR_epoll_create1 = 291
NR_epoll_ctl = 233
EPOLL_CTL_ADD = 1
EFD_SEMAPHORE = 1
TFD_TIMER_ABSTIME = 1
# <linux/timerfd.h>: _IOW('T', 0, __u64); needs CONFIG_CHECKPOINT_RESTORE.
TFD_IOC_SET_TICKS = 0x40085400
_ITIMERSPEC = struct.Struct("<qqqq")  # it_interval {sec, nsec}, it_value {sec, nsec}
_EPOLL_EVENT = struct.Struct("<IQ")  # struct epoll_event is packed on x86_64
_TFD_LINE = re.compile(
    rb"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+).*?ino:([0-9a-f]+)"
)
_PAIR = re.compile(r"\((\d+),\s*(\d+)\)")


# -- readers (dump) ----------------------------------------------------------------


def read_eventfd(pid: int, fd: int) -> dict[str, int]:
    """{count, semaphore} of an eventfd."""
    info = proc.read_fdinfo(pid, fd)
    return {
        "count": int(info["eventfd-count"], 16),
        "semaphore": int(info.get("eventfd-semaphore", "0")),
    }


def read_timerfd(pid: int, fd: int) -> dict:
    """{clockid, ticks, settime_flags, value [s, ns] (time left), interval [s, ns]}."""
    info = proc.read_fdinfo(pid, fd)

    def pair(key: str) -> list[int]:
        m = _PAIR.match(info[key])
        assert m is not None, f"fdinfo {key}: {info[key]!r}"
        return [int(m.group(1)), int(m.group(2))]

    return {
        "clockid": int(info["clockid"]),
        "ticks": int(info["ticks"]),
        "settime_flags": int(info["settime flags"], 8),
        "value": pair("it_value"),
        "interval": pair("it_interval"),
    }


def read_signalfd(pid: int, fd: int) -> dict[str, int]:
    """{mask}: the signals the signalfd reads."""
    return {"mask": int(proc.read_fdinfo(pid, fd)["sigmask"], 16)}


def read_pidfd(pid: int, fd: int) -> dict[str, int]:
    """{pid}: the process a pidfd refers to, as our PID namespace numbers it: -1
    once it was reaped (0 if this namespace cannot see it)."""
    return {"pid": int(proc.read_fdinfo(pid, fd)["Pid"])}


def read_epoll_watches(pid: int, fd: int) -> list[dict[str, int]]:
    """[{tfd, events, data, ino}] of an epoll fd: the fds it watches (by their
    number in the process that added them) and the inode of each watched file."""
    text = proc.read_fdinfo_bytes(pid, fd)
    return [
        {"tfd": int(m[1]), "events": int(m[2], 16), "data": int(m[3], 16), "ino": int(m[4], 16)}
        for m in _TFD_LINE.finditer(text)
    ]


# -- makers (restore, in this process) -------------------------------------------------


def new_eventfd(count: int, semaphore: bool, flags: int) -> int:
    """An eventfd holding `count`; flags: O_NONBLOCK of the dumped fd."""
    nonblock = os.EFD_NONBLOCK if flags & os.O_NONBLOCK else 0
    sem = EFD_SEMAPHORE if semaphore else 0
    return os.eventfd(count, os.EFD_CLOEXEC | nonblock | sem)


def new_timerfd(
    clockid: int,
    flags: int,
    value: list[int],
    interval: list[int],
    ticks: int,
    settime_flags: int = 0,
) -> int:
    """A timerfd armed to fire after `value` (time left), then every `interval`,
    with `ticks` expirations not yet read. With TFD_TIMER_ABSTIME in settime_flags
    it is armed at now + value on its clock, so TFD_TIMER_CANCEL_ON_SET (a realtime
    clock set cancels it) is kept too."""
    fd = syscall(NR_timerfd_create, clockid, os.O_CLOEXEC | (flags & os.O_NONBLOCK))
    try:
        if any(value) or any(interval):
            if settime_flags & TFD_TIMER_ABSTIME:
                at = time.clock_gettime_ns(clockid) + value[0] * 10**9 + value[1]
                value = list(divmod(at, 10**9))
            spec = ctypes.create_string_buffer(_ITIMERSPEC.pack(*interval, *value))
            syscall(NR_timerfd_settime, fd, settime_flags, ctypes.addressof(spec), 0)
        if ticks:
            fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", ticks))
    except BaseException:
        os.close(fd)
        raise
    return fd


def new_signalfd(mask: int, flags: int) -> int:
    sigset = ctypes.c_uint64(mask)
    return syscall(
        NR_signalfd4, (1 << 64) - 1, ctypes.addressof(sigset), 8,
        os.O_CLOEXEC | (flags & os.O_NONBLOCK),
    )  # fmt: skip


def new_epoll(flags: int) -> int:
    """An empty epoll instance; its watches are added in the task."""
    return syscall(NR_epoll_create1, os.O_CLOEXEC)


PIDFD_THREAD = os.O_EXCL  # pidfd_open: a thread, not a process (Linux 6.9)


def new_pidfd(pid: int, flags: int) -> int:
    """A pidfd of process `pid`; flags: O_NONBLOCK and PIDFD_THREAD (O_EXCL) of
    the dumped fd."""
    fd = syscall(NR_pidfd_open, pid, flags & (os.O_NONBLOCK | PIDFD_THREAD))
    os.set_inheritable(fd, False)
    return fd


def new_dead_pidfd(flags: int) -> int:
    """A pidfd of a process that exited and was reaped, as one whose process is
    gone: readable at once, and waitid() on it fails with ECHILD."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        fd = new_pidfd(child, flags & os.O_NONBLOCK)
    finally:
        os.waitpid(child, 0)
    return fd


# -- in the task (injected) ----------------------------------------------------------


def add_epoll_watch(s: SyscallSession, epfd: int, tfd: int, events: int, data: int) -> None:
    """epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, {events, data}) inside the task."""
    buf = s.scratch()
    s.write(buf, _EPOLL_EVENT.pack(events, data))
    s.call(NR_epoll_ctl, epfd, EPOLL_CTL_ADD, tfd, buf)
