"""A copy-on-write child of a frozen process: its memory at one instant, to read at leisure.

`spawn` injects `clone(CLONE_FILES, exit signal 0)` into a thread in a ptrace
stop. The kernel copies page tables, not pages, so this takes milliseconds for
gigabytes; the original can then run on while the child's /proc/PID/mem still
shows the memory as it was. The child never runs an instruction of the target:

- the parent is traced with PTRACE_O_TRACECLONE while the clone runs, so the
  child is born traced by us and stops before returning to user space;
- it gets PTRACE_O_EXITKILL (dies with the tool), and nothing that would end it
  with its parent: it outlives a process that exits right after the thaw (a
  forking server's short-lived worker), whose memory it holds;
- the clone is issued from a scratch code page whose next instructions are
  `exit(0)`: in the microseconds before EXITKILL is set, a tool that dies
  releases a child that exits at once instead of running the target's code.

CLONE_FILES shares the fd table, so the child holds no extra reference on any
pipe or socket and closes nothing itself: a close could block (a FUSE flush to a
daemon frozen in the same tree) or write back (NFS) inside the window. A parent
that exits leaves its files open in the shared table until the child is killed
after the copy: a reader of its pipe sees EOF that much later. With exit signal 0
the parent's SIGCHLD handling never hears of it, but its zombie stays the
parent's until someone waits with __WALL: `reap` injects a waitid for exactly
that pid. Should the parent exit first, the child is re-parented (exit signal
SIGCHLD then) and its new parent reaps it once it is killed.

Not copied on write, and so to be read from the original while it is frozen:
MAP_SHARED memory (shared with the child), MADV_DONTFORK regions (absent in the
child) and MADV_WIPEONFORK regions (zero in the child).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from checkpointer.errors import TargetError
from checkpointer.kernel import proc, ptrace
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import NR_mmap, NR_munmap

NR_clone = 56
NR_waitid = 247
CLONE_FILES = 0x400
P_PID = 1
WNOHANG, WEXITED, __WALL = 1, 4, 0x40000000
PROT_RWX = 7
MAP_SHARED_ANON = 0x01 | 0x20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_U64 = (1 << 64) - 1
_CLONE_EVENTS = (ptrace.PTRACE_EVENT_CLONE, ptrace.PTRACE_EVENT_FORK)

# syscall; mov eax, 60 (exit); xor edi, edi; syscall; ud2
_CLONE_CODE = b"\x0f\x05" + b"\xb8\x3c\x00\x00\x00" + b"\x31\xff" + b"\x0f\x05" + b"\x0f\x0b"


@dataclass
class CowChild:
    """The traced copy-on-write child of `parent`; `pidfd` pins its identity."""

    pid: int
    parent: int
    pidfd: int
    ns_pid: int  # its pid as its parent sees it (another pid namespace: a container)
    dead: bool = False


def spawn(tid: int, pid: int) -> CowChild:
    """Clone thread `tid` (of process `pid`, in a ptrace stop under us) into a traced,
    stopped copy-on-write child. OSError carries clone's errno (ENOMEM under strict
    overcommit, EAGAIN at a pids limit). On any failure, a child already born is
    killed and reaped and the code page unmapped before the error is raised. (Not
    proof against an exception raised by a signal handler in the middle: the caller
    defers those, interrupt.py.)"""
    seccomp = ptrace.PTRACE_O_SUSPEND_SECCOMP if proc.read_seccomp_mode(pid, tid) else 0
    with SyscallSession(tid) as session:
        code = session.call(NR_mmap, 0, PAGE_SIZE, PROT_RWX, MAP_SHARED_ANON, _U64, 0)
        try:
            session.write(code, _CLONE_CODE)
            try:
                ns_pid = _clone(session, tid, code, seccomp)
            except BaseException:
                # The clone may have happened before the failure (its event stop
                # was seen): that child must not stay.
                for child_pid in _born(session):
                    child_ns_pid = _ns_pid_of(child_pid)
                    _kill_traced(child_pid, None)
                    reap(session, child_ns_pid, child_pid)
                raise
            # The clone event's message is the pid in our namespace.
            child_pid = (_born(session) or [ns_pid])[-1]
            try:
                _hold(child_pid, seccomp)
                pidfd = os.pidfd_open(child_pid)
            except BaseException:
                _kill_traced(child_pid, None)
                reap(session, ns_pid, child_pid)
                raise
        finally:
            # (A target that died or a session that broke has nothing to unmap; the
            # error that ended the clone is the one to report.)
            with contextlib.suppress(OSError, TargetError):
                session.call(NR_munmap, code, PAGE_SIZE)
    return CowChild(child_pid, pid, pidfd, ns_pid)


def _born(session: SyscallSession) -> list[int]:
    """The children the session's calls created, as their clone events told."""
    return [msg for event, msg in session.events if event in _CLONE_EVENTS]


def _ns_pid_of(pid: int) -> int:
    """A child's pid as its parent sees it: the last NSpid of its status."""
    try:
        return int(proc.read_status(pid)["NSpid"].split()[-1])
    except (TargetError, KeyError, ValueError):
        return pid


def _clone(session: SyscallSession, tid: int, code: int, seccomp: int) -> int:
    vdso_insn = session.insn
    ptrace.set_options(tid, ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACEFORK | seccomp)
    try:
        session.insn = code
        return session.call(NR_clone, CLONE_FILES, 0, 0, 0, 0)
    finally:
        session.insn = vdso_insn
        ptrace.set_options(tid, seccomp)


def _hold(child: int, seccomp: int) -> None:
    """Wait for the new child's first stop; make it die with us."""
    stop = ptrace.wait_stop(child, 10.0)
    if stop.kind in ("exited", "killed"):
        raise TargetError(f"copy-on-write child {child} {stop.kind} before its first stop")
    ptrace.set_options(child, ptrace.PTRACE_O_EXITKILL | seccomp)


def send_kill(child: CowChild) -> None:
    """SIGKILL the child without waiting: its address space is torn down (~25 ms per
    GiB it mapped) while the caller goes on; `kill` then collects its death."""
    if not child.dead and child.pidfd >= 0:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)


def kill(child: CowChild) -> None:
    """SIGKILL the child and collect its death as its tracer. It stays a zombie of
    its parent until `reap`."""
    if not child.dead:
        _kill_traced(child.pid, child.pidfd)
        child.dead = True
    if child.pidfd >= 0:
        os.close(child.pidfd)
        child.pidfd = -1


def _kill_traced(pid: int, pidfd: int | None) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(16):
        try:
            stop = ptrace.wait_stop(pid, 10.0)
        except TargetError:
            return  # no longer ours to wait for
        if stop.kind in ("exited", "killed"):
            return


def reap(session: SyscallSession, ns_pid: int, pid: int) -> bool:
    """Inside the child's parent (a session on one of its stopped threads): wait for
    exactly that zombie (`ns_pid`: as the parent sees it), with __WALL because its
    exit signal is 0. True if it is gone (`pid`: as we see it)."""
    with contextlib.suppress(OSError, TargetError):
        session.call(NR_waitid, P_PID, ns_pid, 0, WEXITED | WNOHANG | __WALL, 0)
    return not os.path.exists(f"/proc/{pid}")
