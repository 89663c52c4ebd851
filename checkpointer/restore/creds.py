"""Step 6b: seccomp filters, then credentials, last, in CRIU's order, on every
thread (Linux keeps both per thread): groups, gids, bounding set, securebits and
keep-caps, uids, capabilities, ambient capabilities; then the prctl state that
depends on them (dumpable, no_new_privs)."""

from __future__ import annotations

from checkpointer.kernel import ptrace, taskctl
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.proc import read_creds
from checkpointer.restore.images import RestoreError
from checkpointer.restore.task import Task
from checkpointer.restore.tree import TRACE_OPTIONS

SECBIT_KEEP_CAPS = 1 << 4


def restore_creds(task: Task) -> None:
    _attach_seccomp_filters(task)
    creds = task.image.process["creds"]
    state = task.image.process.get("prctl", {})
    if not _same_creds(creds, read_creds(task.pid)) or state.get("securebits"):
        for s in task.threads.values():
            _thread_creds(s, creds, state.get("securebits", 0))
    if "dumpable" in state:
        taskctl.prctl(task.session, taskctl.PR_SET_DUMPABLE, state["dumpable"])
    for s in task.threads.values():
        if state.get("no_new_privs"):
            taskctl.prctl(s, taskctl.PR_SET_NO_NEW_PRIVS, 1)


def _attach_seccomp_filters(task: Task) -> None:
    """Each thread's seccomp filters, oldest first, attached while the task is
    still root (no_new_privs not needed yet, as it was not when a privileged
    program attached them). Our injected calls bypass them from the first
    (PTRACE_O_SUSPEND_SECCOMP, until the detach): the calls that follow, the
    credentials' among them, may be ones the filters forbid."""
    for thread in task.image.threads:
        filters = thread.get("seccomp_filters")
        if not filters:
            continue
        ptrace.set_options(thread["tid"], TRACE_OPTIONS | ptrace.PTRACE_O_SUSPEND_SECCOMP)
        s = task.threads[thread["tid"]]
        for f in filters:
            try:
                taskctl.seccomp_filter(s, f["prog"], f["flags"])
            except OSError as exc:
                raise RestoreError(
                    f"thread {thread['tid']}: its seccomp filter was refused: {exc.strerror}"
                ) from None


def _same_creds(dumped: dict, now: dict) -> bool:
    keys = ("uid", "gid", "cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb")
    return all(dumped[k] == now[k] for k in keys) and sorted(dumped["groups"]) == sorted(
        now["groups"]
    )


def _thread_creds(s: SyscallSession, c: dict, securebits: int) -> None:
    taskctl.setgroups(s, c["groups"])
    taskctl.setresgid(s, *c["gid"])
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last_cap + 1):
        if not c["cap_bnd"] >> cap & 1:
            taskctl.prctl(s, taskctl.PR_CAPBSET_DROP, cap)
    # Securebits while we still hold CAP_SETPCAP; keep the permitted set across
    # the uid change (capset then trims it), unless the bits lock keep-caps.
    if securebits:
        taskctl.prctl(s, taskctl.PR_SET_SECUREBITS, securebits | SECBIT_KEEP_CAPS)
    taskctl.prctl(s, taskctl.PR_SET_KEEPCAPS, 1)
    taskctl.setresuid(s, *c["uid"])
    taskctl.capset(s, c["cap_eff"], c["cap_prm"], c["cap_inh"])
    for cap in range(last_cap + 1):
        if c["cap_amb"] >> cap & 1:
            taskctl.prctl(s, taskctl.PR_CAP_AMBIENT, taskctl.PR_CAP_AMBIENT_RAISE, cap)
    # PR_SET_KEEPCAPS needs no capability, unlike PR_SET_SECUREBITS.
    taskctl.prctl(s, taskctl.PR_SET_KEEPCAPS, 1 if securebits & SECBIT_KEEP_CAPS else 0)
