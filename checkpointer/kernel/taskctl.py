"""Syscalls a restore injects into the task it is rebuilding, one function each.

Every function takes an open SyscallSession on the task (or one of its threads)
and raises OSError with the syscall's errno on failure. Facts: KERNEL-NOTES.md
section 6 (clone3 set_tid, moving the vdso, rseq, PR_SET_MM_MAP).
"""

from __future__ import annotations

import errno
import os
import struct

from checkpointer.kernel import abi
from checkpointer.kernel.inject import At, SyscallSession
from checkpointer.kernel.syscalls import (
    NR_capset,
    NR_chroot,
    NR_clone3,
    NR_close,
    NR_close_range,
    NR_dup3,
    NR_fchdir,
    NR_fcntl,
    NR_flock,
    NR_madvise,
    NR_mlock,
    NR_mlock2,
    NR_mmap,
    NR_mprotect,
    NR_mremap,
    NR_munmap,
    NR_personality,
    NR_pidfd_getfd,
    NR_pidfd_open,
    NR_prctl,
    NR_rseq,
    NR_rt_sigaction,
    NR_rt_sigqueueinfo,
    NR_rt_tgsigqueueinfo,
    NR_set_robust_list,
    NR_set_tid_address,
    NR_setfsgid,
    NR_setfsuid,
    NR_setgroups,
    NR_setitimer,
    NR_setpgid,
    NR_setresgid,
    NR_setresuid,
    NR_setsid,
    NR_sigaltstack,
    NR_timer_create,
    NR_timer_delete,
    NR_timer_settime,
    NR_umask,
)

NR_wait4 = 61
NR_rt_sigtimedwait = 128
__WALL = 0x40000000

O_CLOEXEC = 0o2000000
F_SETFD = 2
F_DUPFD_CLOEXEC = 1030
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_GROWSDOWN, MAP_FIXED_NOREPLACE = 0x4000, 0x0100, 0x100000
MAP_DROPPABLE = 0x08  # a mapping type, as MAP_PRIVATE: pages the kernel may drop (6.11)
PROT_RWX = 0x7  # read, write, exec
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 8, 24, 28
PR_SET_MM, PR_SET_MM_MAP = 35, 14
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_THP_DISABLE = 36, 38, 41
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
_CAP_HEADER_V3 = 0x20080522
_NO_FD = (1 << 64) - 1


# -- processes and threads ---------------------------------------------------


def clone3(s: SyscallSession, flags: int, set_tid: int, exit_signal: int = 0) -> int:
    """clone3 with set_tid = [set_tid]: the new task gets exactly that id (or EEXIST);
    set_tid 0: whatever id the kernel gives.

    With stack 0 the child resumes at the same instruction as the caller, with
    rax 0: in a traced caller it is auto-attached (PTRACE_O_TRACEFORK/CLONE) and
    first reports a PTRACE_EVENT_STOP.
    """
    addr = s.scratch()
    tid_array = addr + abi.CLONE_ARGS.size
    wanted = 1 if set_tid else 0
    args = abi.CLONE_ARGS.pack(
        flags, 0, 0, 0, exit_signal, 0, 0, 0, tid_array if wanted else 0, wanted, 0
    )
    s.write(addr, args + struct.pack("<i", set_tid))
    return s.call(NR_clone3, addr, abi.CLONE_ARGS.size)


def reap(s: SyscallSession, pid: int) -> None:
    """wait4(pid, __WALL) in the task: reap its exited child `pid`."""
    s.call(NR_wait4, pid, 0, __WALL, 0)


def discard_signal(s: SyscallSession, sig: int) -> None:
    """Take a pending `sig` off the task (rt_sigtimedwait, no wait): one the restore
    itself caused (a SIGCHLD from a helper it reaped)."""
    addr = s.scratch()
    s.write(addr, struct.pack("<Qqq", 1 << (sig - 1), 0, 0))
    s.call_raw(NR_rt_sigtimedwait, addr, 0, addr + 8, 8)


def setsid(s: SyscallSession) -> int:
    return s.call(NR_setsid)


def setpgid(s: SyscallSession, pgid: int) -> None:
    s.call(NR_setpgid, 0, pgid)


# -- memory --------------------------------------------------------------------


def mmap(
    s: SyscallSession, addr: int, length: int, prot: int, flags: int, fd: int = -1, off: int = 0
) -> int:
    return s.call(NR_mmap, addr, length, prot, flags, fd & _NO_FD, off)


def mmap_many(s: SyscallSession, maps: list[tuple[int, int, int, int, int, int]]) -> list[int]:
    """mmap(addr, length, prot, flags, fd, off) for each of `maps`, in order, a batch
    at a time (two stops per batch, not per call: a process with 30,000 mappings
    has them restored in 120 batches). Each result is the mapped address, or a
    negative errno."""
    room = s.batch_room()
    results: list[int] = []
    for i in range(0, len(maps), room):
        calls = [(NR_mmap, a, n, p, f, fd & _NO_FD, o) for a, n, p, f, fd, o in maps[i : i + room]]
        raw, _ = s.call_many(calls, check=False)
        results += [r - (1 << 64) if r >= (1 << 64) - 4095 else r for r in raw]
    return results


def munmap(s: SyscallSession, addr: int, length: int) -> None:
    s.call(NR_munmap, addr, length)


def mremap_to(s: SyscallSession, old: int, size: int, new: int) -> int:
    """Move [old, old+size) to new (MREMAP_MAYMOVE|FIXED); works for [vdso]/[vvar]."""
    return s.call(NR_mremap, old, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, new)


def mprotect(s: SyscallSession, addr: int, length: int, prot: int) -> None:
    s.call(NR_mprotect, addr, length, prot)


def madvise(s: SyscallSession, addr: int, length: int, advice: int) -> None:
    s.call(NR_madvise, addr, length, advice)


MLOCK_ONFAULT = 1  # mlock2: lock pages as they are faulted in, not all at once


def mlock(s: SyscallSession, addr: int, length: int, on_fault: bool = False) -> None:
    if on_fault:
        s.call(NR_mlock2, addr, length, MLOCK_ONFAULT)
    else:
        s.call(NR_mlock, addr, length)


def set_mm_map(s: SyscallSession, fields: dict, auxv: bytes, exe_fd: int) -> None:
    """prctl(PR_SET_MM, PR_SET_MM_MAP): code/data/brk/stack/arg/env bounds, auxv, exe.

    The exe can only change while no mapping of the current exe exists.
    """
    if len(auxv) > abi.AUXV_MAX:
        raise ValueError(f"auxv of {len(auxv)} bytes is over the kernel's {abi.AUXV_MAX}")
    addr = s.scratch()
    auxv_addr = addr + abi.PRCTL_MM_MAP.size
    values = [fields[name] for name in abi.MM_MAP_FIELDS]
    packed = abi.PRCTL_MM_MAP.pack(*values, auxv_addr, len(auxv), exe_fd)
    s.write(addr, packed + auxv)
    s.call(NR_prctl, PR_SET_MM, PR_SET_MM_MAP, addr, abi.PRCTL_MM_MAP.size, 0)


# -- files -----------------------------------------------------------------------


def close_all_fds(s: SyscallSession) -> None:
    s.call(NR_close_range, 0, 0xFFFFFFFF, 0)


def pidfd_open(s: SyscallSession, pid: int) -> int:
    """A pidfd for `pid` inside the task: its way to take fds from our process."""
    return s.call(NR_pidfd_open, pid, 0)


def take_fd(s: SyscallSession, pidfd: int, their_fd: int) -> int:
    """Copy fd `their_fd` of the process behind `pidfd` into the task, close-on-exec,
    wherever it lands (take_fds puts fds at given numbers); its number there."""
    return s.call(NR_pidfd_getfd, pidfd, their_fd, 0)


def take_fds(
    s: SyscallSession, pidfd: int, fds: list[tuple[int, int, bool]], in_use: set[int]
) -> None:
    """Copy fd `their_fd` of the process behind `pidfd` into the task at fd `at`,
    close-on-exec or not, for each (their_fd, at, cloexec) of `fds`: a batch at a
    time instead of one to three stops each. pidfd_getfd takes the lowest free
    number (and sets FD_CLOEXEC), which the calls after it must name before they
    run: `in_use`, the task's open fds now (nothing else changes its table
    meanwhile: its threads are stopped), tells it, and is kept up to date. Raises
    OSError naming the fd that failed."""
    room = max(3, s.batch_room())
    calls: list[tuple] = []
    expect: list[tuple[int, int]] = []  # (result the call must give, fd it is for)

    def run() -> None:
        results, _ = s.call_many(calls, check=False)
        for (want, at), got in zip(expect, results, strict=True):
            if got != want:
                err = (1 << 64) - got if got >= (1 << 64) - 4095 else 0
                why = os.strerror(err) if err else f"got fd {got}, not {want}"
                raise OSError(err or errno.EBADF, f"fd {at}: {why}")
        calls.clear()
        expect.clear()

    low = 0  # the lowest free number: only ever taken where it is asked for
    for their_fd, at, cloexec in fds:
        if len(calls) + 3 > room:
            run()
        while low in in_use:
            low += 1
        calls.append((NR_pidfd_getfd, pidfd, their_fd, 0))
        expect.append((low, at))
        if low == at:
            if not cloexec:  # pidfd_getfd always sets FD_CLOEXEC
                calls.append((NR_fcntl, at, F_SETFD, 0))
                expect.append((0, at))
        else:
            calls.append((NR_dup3, low, at, O_CLOEXEC if cloexec else 0))
            calls.append((NR_close, low))
            expect += [(at, at), (0, at)]
        in_use.add(at)
    if calls:
        run()


def dup_above(s: SyscallSession, fd: int, lowest: int) -> int:
    """Move fd to the lowest free number >= lowest (close-on-exec); the new number."""
    if fd >= lowest:
        return fd
    new = s.call(NR_fcntl, fd, F_DUPFD_CLOEXEC, lowest)
    s.call(NR_close, fd)
    return new


def close(s: SyscallSession, fd: int) -> None:
    s.call(NR_close, fd)


def fchdir(s: SyscallSession, fd: int) -> None:
    s.call(NR_fchdir, fd)


def chroot_here(s: SyscallSession) -> None:
    """chroot(".") after an fchdir to the new root."""
    addr = s.scratch()
    s.write(addr, b".\0")
    s.call(NR_chroot, addr)


def umask(s: SyscallSession, mask: int) -> None:
    s.call(NR_umask, mask)


def personality(s: SyscallSession, persona: int) -> None:
    s.call(NR_personality, persona)


# -- per-thread state ------------------------------------------------------------------


def set_tid_address(s: SyscallSession, addr: int) -> None:
    s.call(NR_set_tid_address, addr)


def set_robust_list(s: SyscallSession, head: int, length: int) -> None:
    s.call(NR_set_robust_list, head, length)


def rseq_register(s: SyscallSession, ptr: int, size: int, sig: int) -> None:
    s.call(NR_rseq, ptr, size, 0, sig)


def rseq_unregister(s: SyscallSession, ptr: int, size: int, sig: int) -> None:
    s.call(NR_rseq, ptr, size, abi.RSEQ_FLAG_UNREGISTER, sig)


def sigaltstack(s: SyscallSession, sp: int, flags: int, size: int) -> None:
    addr = s.scratch()
    s.write(addr, abi.pack_stack(sp, flags, size))
    s.call(NR_sigaltstack, addr, 0)


def set_name(s: SyscallSession, name: str) -> None:
    """PR_SET_NAME: the calling thread's comm (15 bytes at most)."""
    addr = s.scratch()
    s.write(addr, name.encode("utf-8", "surrogateescape")[:15] + b"\0")
    s.call(NR_prctl, PR_SET_NAME, addr, 0, 0, 0)


NR_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1


def seccomp_filter(s: SyscallSession, prog: bytes, flags: int) -> None:
    """Attach one seccomp BPF program (struct sock_filter[]) to the calling thread:
    seccomp(SECCOMP_SET_MODE_FILTER, flags, &struct sock_fprog)."""
    # Its own mapping, wherever the kernel finds room: a program (up to 32 KiB) may
    # not fit the scratch area, and the task's layout is final by now.
    size = 16 + len(prog)  # (the kernel rounds it up to pages)
    addr = mmap(s, 0, size, 3, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        # struct sock_fprog: unsigned short len; (padding); struct sock_filter *filter
        s.write(addr, struct.pack("<HxxxxxxQ", len(prog) // 8, addr + 16) + prog)
        s.call(NR_seccomp, SECCOMP_SET_MODE_FILTER, flags, addr)
    finally:
        munmap(s, addr, size)


def prctl(s: SyscallSession, option: int, arg2: int = 0, arg3: int = 0) -> int:
    return s.call(NR_prctl, option, arg2, arg3, 0, 0)


# -- POSIX timers ----------------------------------------------------------------------

MAX_TIMER_ID_STEPS = 1 << 16


def create_posix_timer(s: SyscallSession, timer: dict) -> None:
    """timer_create in the task with the dumped id: ids come one after another
    from 0 in a new process, so timers are made in id order and the ones made
    only to reach an id are deleted again."""
    addr = s.scratch()
    tid = timer["target"] if timer["notify"] & abi.SIGEV_THREAD_ID else 0
    event = abi.SIGEVENT.pack(timer["sigval"], timer["signo"], timer["notify"], tid)
    s.write(addr, event)
    for _ in range(MAX_TIMER_ID_STEPS):
        s.call(NR_timer_create, timer["clock"], addr, addr + abi.SIGEVENT.size)
        got = struct.unpack("<i", s.read(addr + abi.SIGEVENT.size, 4))[0]
        if got == timer["id"]:
            return
        if got > timer["id"]:
            raise OSError(errno.EBUSY, f"POSIX timer {timer['id']} came back as {got}")
        s.call(NR_timer_delete, got)
    raise OSError(errno.EBUSY, f"POSIX timer {timer['id']} is out of reach")


def set_posix_timer(s: SyscallSession, timer_id: int, value: list[int], interval: list[int]):
    addr = s.scratch()
    s.write(addr, abi.ITIMERSPEC.pack(*interval, *value))
    s.call(NR_timer_settime, timer_id, 0, addr, 0)


# -- file locks ----------------------------------------------------------------------

F_SETLK, F_OFD_SETLK = 6, 37
F_RDLCK, F_WRLCK = 0, 1
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
_FLOCK = struct.Struct("<hhxxxxqqixxxx")  # struct flock: type, whence, start, len, pid


def flock(s: SyscallSession, fd: int, write: bool) -> None:
    """flock(fd, LOCK_SH or LOCK_EX, without waiting) in the task."""
    s.call(NR_flock, fd, (LOCK_EX if write else LOCK_SH) | LOCK_NB)


def set_record_lock(
    s: SyscallSession, fd: int, ofd: bool, write: bool, start: int, length: int
) -> None:
    """A POSIX (the task's) or open-file-description record lock on bytes
    [start, start+length) of fd, length 0 meaning to the end of the file, without
    waiting."""
    addr = s.scratch()
    s.write(addr, _FLOCK.pack(F_WRLCK if write else F_RDLCK, os.SEEK_SET, start, length, 0))
    s.call(NR_fcntl, fd, F_OFD_SETLK if ofd else F_SETLK, addr)


# -- signals ---------------------------------------------------------------------------


def sigaction(s: SyscallSession, sig: int, handler: int, flags: int, restorer: int, mask: int):
    addr = s.scratch()
    s.write(addr, abi.pack_sigaction(handler, flags, restorer, mask))
    s.call(NR_rt_sigaction, sig, addr, 0, abi.SIGSET_SIZE)


def sigactions(s: SyscallSession, acts: list[tuple[int, int, int, int, int]]) -> None:
    """sigaction() for each (sig, handler, flags, restorer, mask), in one batch: a
    process has 62 of them, two stops each one by one."""
    size = len(abi.pack_sigaction(0, 0, 0, 0))
    data = b"".join(abi.pack_sigaction(h, f, r, m) for _, h, f, r, m in acts)
    calls = [
        (NR_rt_sigaction, sig, At(i * size), 0, abi.SIGSET_SIZE) for i, (sig, *_) in enumerate(acts)
    ]
    s.call_many(calls, data=data)


def setitimer(s: SyscallSession, which: int, interval_us: int, value_us: int) -> None:
    addr = s.scratch()
    s.write(addr, abi.pack_itimerval(interval_us, value_us))
    s.call(NR_setitimer, which, addr, 0)


def queue_signal(s: SyscallSession, pid: int, tid: int | None, siginfo: bytes) -> None:
    """Queue a saved siginfo again, from inside the task itself (only a task
    signalling itself may pass a kernel si_code). tid None: the process queue."""
    addr = s.scratch()
    s.write(addr, siginfo)
    sig = struct.unpack_from("<i", siginfo)[0]
    if tid is None:
        s.call(NR_rt_sigqueueinfo, pid, sig, addr)
    else:
        s.call(NR_rt_tgsigqueueinfo, pid, tid, sig, addr)


# -- credentials -------------------------------------------------------------------------


def setgroups(s: SyscallSession, groups: list[int]) -> None:
    addr = s.scratch(4 * max(len(groups), 1))
    s.write(addr, struct.pack(f"<{len(groups)}I", *groups))
    s.call(NR_setgroups, len(groups), addr)


def setresgid(s: SyscallSession, r: int, e: int, saved: int, fs: int) -> None:
    s.call(NR_setresgid, r, e, saved)
    s.call(NR_setfsgid, fs)


def setresuid(s: SyscallSession, r: int, e: int, saved: int, fs: int) -> None:
    s.call(NR_setresuid, r, e, saved)
    s.call(NR_setfsuid, fs)


def capset(s: SyscallSession, eff: int, prm: int, inh: int) -> None:
    """capset v3 (two 32-bit halves of each set) for the calling thread."""
    addr = s.scratch()
    lo, hi = (1 << 32) - 1, 32
    data = struct.pack(
        "<II6I", _CAP_HEADER_V3, 0,
        eff & lo, prm & lo, inh & lo, eff >> hi, prm >> hi, inh >> hi,
    )  # fmt: skip
    s.write(addr, data)
    s.call(NR_capset, addr, addr + 8)
