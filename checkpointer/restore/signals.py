"""Step 6a: signal handlers, interval timers, POSIX timers and pending signals.

POSIX timers come after the threads (restore_posix_timers): one may signal a
single thread (SIGEV_THREAD_ID, as glibc's SIGEV_THREAD timers do, aimed at its
helper thread), and timer_create refuses a thread that does not exist yet.

Handlers come back with their flags, mask and restorer (x86_64 has no sigreturn
trampoline in the vdso: SA_RESTORER's address is glibc's). Pending signals are
queued again from inside the task, whose signals stay blocked until its final
mask is set, so they are delivered when it would have got them.
"""

from __future__ import annotations

from checkpointer.kernel import abi, taskctl
from checkpointer.kernel.inject import SyscallSession
from checkpointer.restore.task import Task


def restore_process_signals(task: Task) -> None:
    s, process = task.session, task.image.process
    taskctl.sigactions(
        s,
        [
            (act["sig"], act["handler"], act["flags"], act["restorer"], act["mask"])
            for act in process.get("sigactions", [])
        ],
    )
    for which, name in enumerate(abi.ITIMER_NAMES):
        interval, value = process.get("itimers", {}).get(name, [0, 0])
        if value or interval:
            # value 0 with an interval: it expired just as it was read and is
            # being re-armed; arm it for one interval.
            taskctl.setitimer(s, which, interval, value or interval)
    for info in process.get("shared_siginfo", []):
        taskctl.queue_signal(s, task.pid, None, info)


def restore_posix_timers(task: Task) -> None:
    """timer_create with each dumped id, armed with the time it had left; once
    every thread exists."""
    s = task.session
    for timer in sorted(task.image.process.get("posix_timers", []), key=lambda t: t["id"]):
        if timer["notify"] & abi.SIGEV_THREAD_ID and timer["target"] not in task.threads:
            # Its thread had exited: the kernel signals nobody when it fires.
            # timer_create refuses a thread outside the process, so it comes back
            # signalling nobody too, with its id and time left.
            timer = {**timer, "notify": abi.SIGEV_NONE}
        taskctl.create_posix_timer(s, timer)
        value, interval = timer["value"], timer["interval"]
        if any(value) or any(interval):
            # (no time left but an interval: it expired as it was read, re-arming)
            taskctl.set_posix_timer(s, timer["id"], value if any(value) else interval, interval)


def restore_thread_signals(task: Task, s: SyscallSession, thread: dict) -> None:
    alt = thread.get("sigaltstack")
    if alt and not alt["flags"] & abi.SS_DISABLE:
        taskctl.sigaltstack(s, alt["sp"], alt["flags"] & abi.SS_AUTODISARM, alt["size"])
    for info in thread.get("siginfo", []):
        taskctl.queue_signal(s, task.pid, thread["tid"], info)
