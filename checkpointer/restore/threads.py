"""Step 5 and 7: threads, their own state, and finally every thread's registers.

Threads are cloned with their original TIDs from the main thread (clone3 with
CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM and set_tid); a new thread starts with
no rseq and no clear-child-tid address, so each gets back its tid address (which
pthread_join waits on), robust list, rseq area, alternate stack and name.

Registers last: the general registers with the restart fix-up for a thread
stopped inside a syscall, then the XSAVE area, then the blocked-signal mask.

The fix-up does what the kernel would have done on the way out of the syscall.
Most interrupted syscalls are simply issued again. Those the kernel resumes
through a restart block (poll, nanosleep, clock_nanosleep, futex with a timeout)
cannot be: the block stayed in the old kernel task. CRIU returns EINTR to them,
which programs that installed no handler do not expect (GNU `tail -f` gives up on
it); here they are issued again with their own arguments, still in the registers
(a timeout starts over: later than the program asked, never an error). A thread
already inside restart_syscall (it had been stopped and resumed before, by an
earlier leave-running pass for one) no longer shows which syscall it restarts;
the usual `mov $NR, %eax; syscall` before its instruction pointer tells, and
only without it does it get EINTR.
"""

from __future__ import annotations

import errno
import struct

from checkpointer.errors import TargetError
from checkpointer.kernel import abi, ptrace, sched, taskctl
from checkpointer.kernel.memory import MemReader
from checkpointer.kernel.syscalls import NR_exit
from checkpointer.restore import signals
from checkpointer.restore.images import RestoreError
from checkpointer.restore.task import Task, clone_task

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
NR_restart_syscall = 219
MOV_EAX_SYSCALL = 7  # bytes of `mov $imm32, %eax` (b8 imm32) then `syscall` (0f 05)
_U64 = (1 << 64) - 1
XSTATE_XFEATURES = 472  # u64 in the FXSAVE area's software-reserved bytes (xfeatures)


def create_threads(task: Task, created: list[int]) -> None:
    for tid in task.image.tids:
        if tid == task.pid:
            continue
        s = clone_task(task.session, abi.CLONE_THREAD_FLAGS, tid, 0, created)
        if task.scratch:
            s.adopt_scratch(*task.scratch)
        task.threads[tid] = s


def restore_thread_state(task: Task) -> None:
    for thread in task.image.threads:
        s = task.threads[thread["tid"]]
        if "tid_address" in thread:
            taskctl.set_tid_address(s, thread["tid_address"])
        head, length = thread.get("robust_list", [0, 0])
        if head:
            taskctl.set_robust_list(s, head, length)
        rseq = thread.get("rseq", {})
        if rseq.get("ptr"):
            taskctl.rseq_register(s, rseq["ptr"], rseq["size"], rseq["sig"])
        if "comm" in thread:
            taskctl.set_name(s, thread["comm"])
        elif thread["tid"] == task.pid:
            taskctl.set_name(s, task.image.process["comm"])
        signals.restore_thread_signals(task, s, thread)


def check_xstate(seed_tid: int, thread: dict) -> None:
    """Refuse an XSAVE area from a CPU with other state components or layout."""
    mine = ptrace.get_xstate(seed_tid)
    theirs = thread["xstate"]
    if len(theirs) != len(mine) or _xfeatures(theirs) != _xfeatures(mine):
        raise RestoreError(
            f"thread {thread['tid']}: its FPU/vector state comes from a CPU with other "
            f"features ({len(theirs)} bytes, xfeatures {_xfeatures(theirs):#x}; this CPU: "
            f"{len(mine)} bytes, {_xfeatures(mine):#x})"
        )


def _xfeatures(blob: bytes) -> int:
    if len(blob) < XSTATE_XFEATURES + 8:
        return 0
    return struct.unpack_from("<Q", blob, XSTATE_XFEATURES)[0]


def restart_fixup(regs: dict[str, int], code_before: bytes = b"") -> dict[str, int]:
    """The registers a thread stopped inside a syscall resumes with (see above);
    code_before: the MOV_EAX_SYSCALL bytes that end at its instruction pointer."""
    regs = dict(regs)
    orig = regs["orig_rax"]
    ax = regs["rax"] - (1 << 64) if regs["rax"] >= 1 << 63 else regs["rax"]
    if orig >= 1 << 63:  # orig_rax < 0: not stopped inside a syscall
        return regs
    if -ax == ERESTART_RESTARTBLOCK:
        orig = _restarted_syscall(code_before) if orig == NR_restart_syscall else orig
        if orig is None:
            regs["rax"] = -errno.EINTR & _U64
            return regs
    if -ax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
        regs["rax"] = orig
        regs["rip"] -= 2
    return regs


def _restarted_syscall(code: bytes) -> int | None:
    if len(code) == MOV_EAX_SYSCALL and code[0] == 0xB8 and code[5:] == b"\x0f\x05":
        nr = struct.unpack_from("<I", code, 1)[0]
        return nr if nr != NR_restart_syscall else None
    return None


def _code_before(pid: int, regs: dict[str, int]) -> bytes:
    """The bytes before the thread's instruction pointer, for restart_fixup: only
    read for a thread inside restart_syscall."""
    if regs["orig_rax"] != NR_restart_syscall:
        return b""
    try:
        with MemReader(pid) as mem:
            return mem.read(regs["rip"] - MOV_EAX_SYSCALL, MOV_EAX_SYSCALL)
    except (OSError, TargetError):
        return b""  # unreadable: it gets EINTR


def restore_scheduling(task: Task) -> None:
    """Each thread's nice value, policy, real-time priority and CPU affinity, and
    the process's OOM-killer adjustment: set from here, by thread id (images
    from before they were recorded keep the restorer's)."""
    for thread in task.image.threads:
        if "sched" in thread:
            try:
                sched.set_thread_sched(thread["tid"], thread["sched"])
            except OSError as exc:
                raise RestoreError(
                    f"thread {thread['tid']}: scheduling {thread['sched']}: {exc.strerror}"
                ) from None
    if "oom_score_adj" in task.image.process:
        sched.set_oom_score_adj(task.pid, task.image.process["oom_score_adj"])


def set_registers(task: Task) -> None:
    for thread in task.image.threads:
        tid = thread["tid"]
        regs = thread["regs"]
        ptrace.set_regs(tid, restart_fixup(regs, _code_before(task.pid, regs)))
        ptrace.set_xstate(tid, thread["xstate"])
        ptrace.set_sigmask(tid, thread["blocked"])
    if leader_had_exited(task):
        # Its main thread had called pthread_exit: the leader, which did the
        # restoring, ends with exit(2) once released and stays a zombie while the
        # other threads run, as it was.
        regs = ptrace.get_regs(task.pid)
        regs.update(rip=task.session.insn, rax=NR_exit, rdi=0, orig_rax=_U64)
        ptrace.set_regs(task.pid, regs)
        ptrace.set_sigmask(task.pid, _U64)


def leader_had_exited(task: Task) -> bool:
    """The dump holds no main thread: it had exited while other threads ran."""
    return task.pid not in task.image.tids
