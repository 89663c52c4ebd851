"""Step 5 and 7: threads, their own state, and finally every thread's registers.

Threads are cloned with their original TIDs from the main thread (clone3 with
CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM and set_tid); a new thread starts with
no rseq and no clear-child-tid address, so each gets back its tid address (which
pthread_join waits on), robust list, rseq area, alternate stack and name.

Registers last: the general registers with CRIU's restart fix-up for a thread
stopped inside a syscall, then the XSAVE area, then the blocked-signal mask.
"""

from __future__ import annotations

import errno
import struct

from checkpointer.kernel import abi, ptrace, taskctl
from checkpointer.restore import signals
from checkpointer.restore.images import RestoreError
from checkpointer.restore.task import Task, clone_task

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
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


def restart_fixup(regs: dict[str, int]) -> dict[str, int]:
    """What the kernel would have done on return from an interrupted syscall."""
    regs = dict(regs)
    orig = regs["orig_rax"]
    ax = regs["rax"] - (1 << 64) if regs["rax"] >= 1 << 63 else regs["rax"]
    if orig < 1 << 63:  # orig_rax >= 0: stopped inside a syscall
        if -ax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            regs["rax"] = orig
            regs["rip"] -= 2
        elif -ax == ERESTART_RESTARTBLOCK:
            regs["rax"] = -errno.EINTR & _U64
    return regs


def set_registers(task: Task) -> None:
    for thread in task.image.threads:
        tid = thread["tid"]
        ptrace.set_regs(tid, restart_fixup(thread["regs"]))
        ptrace.set_xstate(tid, thread["xstate"])
        ptrace.set_sigmask(tid, thread["blocked"])
