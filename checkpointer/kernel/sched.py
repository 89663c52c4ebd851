"""Scheduling state a task keeps in the kernel and another process may read and
set by its thread id: nice value, policy and real-time priority, CPU affinity,
I/O priority (ionice); and the process's OOM-killer adjustment."""

from __future__ import annotations

import logging
import os

from checkpointer.kernel.syscalls import NR_ioprio_get, NR_ioprio_set, syscall

IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread

log = logging.getLogger("checkpointer")


def read_thread_sched(tid: int) -> dict:
    """{nice, policy, priority, cpus, ioprio} of thread tid (policy with
    SCHED_RESET_ON_FORK if set, as sched_getscheduler returns it; ioprio as
    ioprio_get returns it: class << 13 | level, 0 if never set)."""
    return {
        "nice": os.getpriority(os.PRIO_PROCESS, tid),
        "policy": os.sched_getscheduler(tid),
        "priority": os.sched_getparam(tid).sched_priority,
        "cpus": sorted(os.sched_getaffinity(tid)),
        "ioprio": syscall(NR_ioprio_get, IOPRIO_WHO_PROCESS, tid),
    }


def set_thread_sched(tid: int, sched: dict) -> None:
    """The scheduling of a thread as read_thread_sched read it. CPUs this machine
    does not have are left out of the affinity (a migration); if none is left, the
    thread may run anywhere, and the log says so."""
    os.sched_setscheduler(tid, sched["policy"], os.sched_param(sched["priority"]))
    os.setpriority(os.PRIO_PROCESS, tid, sched["nice"])
    here = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    cpus = set(sched["cpus"]) & here
    if not cpus:
        log.warning("thread %d: none of its CPUs %s is here: runs on any", tid, sched["cpus"])
        cpus = here
    os.sched_setaffinity(tid, cpus)
    if sched.get("ioprio"):  # (absent from older images)
        syscall(NR_ioprio_set, IOPRIO_WHO_PROCESS, tid, sched["ioprio"])


def read_oom_score_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


def set_oom_score_adj(pid: int, value: int) -> None:
    with open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write(str(value))
