"""Step 1: create every process of the tree with its original PID, in its session
and process group.

A seed, forked from the restorer and seized, is the only process not built from
the images. clone3 with set_tid injected into it creates the root (CLONE_PARENT:
the root becomes the restorer's child, which `restore` waits for); every other
process is cloned from its parent once the parent's memory is rebuilt, so the
two share it copy-on-write as they did (restore/inherit.py). The tracer options
are inherited, so each new process is traced from its first instruction, and
PTRACE_O_EXITKILL kills the whole half-built tree if the restorer dies. Last,
each process joins its cgroup (v2) again.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time

from checkpointer.kernel import abi, cgroup, proc, ptrace, taskctl
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import NR_exit_group, libc
from checkpointer.restore import inherit
from checkpointer.restore.images import RestoreError, RestoreImages, leaders_outside
from checkpointer.restore.task import Task, clone_task

log = logging.getLogger("checkpointer")

TRACE_OPTIONS = ptrace.PTRACE_O_TRACEFORK | ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_EXITKILL
PR_SET_PDEATHSIG = 1
__WALL = 0x40000000


class Seed:
    """A forked, seized child of ours that only ever runs injected syscalls."""

    task = None  # its memory is nobody's: what is cloned from it keeps nothing

    def __init__(self) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait to be seized, die with the restorer
            try:
                os.close(write_end)
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                os.read(read_end, 1)
            finally:
                os._exit(0)
        os.close(read_end)
        self.pid = pid
        self._pipe = write_end
        ptrace.seize(pid, TRACE_OPTIONS)
        ptrace.interrupt(pid)
        while (stop := ptrace.wait_stop(pid)).kind == "signal-stop":
            ptrace.cont(pid, stop.sig)
        self.session = SyscallSession(pid, restore_regs=False)
        self.session.open()

    def kill(self) -> None:
        self.session.close()
        kill_and_reap([self.pid])
        os.close(self._pipe)


def create_tree(
    images: RestoreImages,
    origin,
    created: list[int],
    build=lambda task: None,
    on_setsid=lambda task: None,
) -> dict[int, Task]:
    """Every process, each stopped in its first ptrace stop, in tree order. The
    root is cloned from `origin`: the Seed, or a template holding memory the root
    may keep (restore/template.py; `origin.task` is then its Task).
    build(task) runs in each process before any other is cloned from it (its
    memory: the processes cloned from it share it copy-on-write); on_setsid(task)
    in each new session leader before its session's other processes exist (a
    controlling terminal they inherit)."""
    procs = images.by_pid()
    job = shell_job_group(images)
    # Sessions and groups whose leader exited, each started again by a helper for
    # the first of its processes created; the others join it as they did. Not a
    # shell job's session, nor its group: the restoring shell's are taken instead
    # (the dumping shell may have exited, its terminal closed).
    gone = _gone_leaders(images) - {job, shell_job_session(images)}
    remade: set[int] = set()
    tasks: dict[int, Task] = {}
    root = images.root
    with inherit.cloning(origin.task, root):
        if {root.sid, root.pgid} & gone:  # a daemon: its session's leader exited
            clone = _clone_through_leader(origin.session, root, gone, remade, created)
        else:
            clone = _clone(origin.session, root.pid, True, created)
    tasks[root.pid] = Task(root, clone, cloned_from=origin.task)
    for image in images.processes:
        if image.pid not in tasks:  # an orphan: its parent is not in the tree
            root_task = tasks[root.pid]
            with inherit.cloning(root_task, image):
                orphan = _clone(root_task.session, image.pid, True, created)
            tasks[image.pid] = Task(image, orphan, cloned_from=root_task)
        task = tasks[image.pid]
        build(task)
        kids = [procs[c] for c in image.children]
        # A child in another session than its parent's was forked before the parent
        # became a session leader: create it first, then setsid.
        early = [k for k in kids if k.sid not in (image.sid, k.pid) and k.sid not in gone]
        for kid in early:
            if image.sid != image.pid:
                raise RestoreError(f"process {kid.pid}: its session {kid.sid} cannot be rebuilt")
            with inherit.cloning(task, kid):
                clone = _clone(task.session, kid.pid, False, created)
            tasks[kid.pid] = Task(kid, clone, cloned_from=task)
        if image.sid == image.pid:
            taskctl.setsid(task.session)
            on_setsid(task)
        for kid in kids:
            if kid.pid in tasks:
                continue
            with inherit.cloning(task, kid):
                if {kid.sid, kid.pgid} & (gone - remade):
                    clone = _clone_through_leader(task.session, kid, gone, remade, created, task)
                else:
                    clone = _clone(task.session, kid.pid, False, created)
            tasks[kid.pid] = Task(kid, clone, cloned_from=task)
    _join_groups(images, tasks, job, remade)
    return tasks


def shell_job_group(images: RestoreImages) -> int | None:
    """The process group of a shell job (dumped with --shell-job, its root in the
    shell's session) that its root does not lead (a pipeline's later command, a
    job of a shell without job control), which the tree joins the restorer's
    instead, as CRIU does: a job restored in the foreground of a shell (restore
    not detached) is then in the terminal's foreground group, reads the terminal
    without being stopped (SIGTTIN), gets ^C (which the waiting restorer ignores:
    wait_root) and ^Z with the restorer, and the shell's job control sees both
    through the restorer. A root that leads its group keeps it: own_job_group."""
    root = _shell_job_root(images)
    return None if root is None or root.pgid == root.pid else root.pgid


def shell_job_session(images: RestoreImages) -> int | None:
    """The session of a shell job's shell (the root does not lead it), which the
    tree leaves for the restorer's."""
    root = _shell_job_root(images)
    return None if root is None else root.sid


def own_job_group(images: RestoreImages) -> int | None:
    """The process group of a shell job that led its own (what a job-control shell
    makes of every job), in the shell's session: it comes back, and the restorer,
    waiting in the foreground, gives it the terminal as the shell had
    (restorer.wait_root). A shell (bash, zsh) remembers its group and takes the
    terminal back for it after each command: in the restorer's group instead,
    it exited after its first command line."""
    root = _shell_job_root(images)
    return root.pid if root is not None and root.pgid == root.pid else None


def job_foreground(images: RestoreImages) -> int | None:
    """The process group a shell job that leads its own (own_job_group) gives the
    terminal to: the tree's group that had it at the dump (a job of a restored
    interactive shell, as vim run from bash), else the job's own."""
    own = own_job_group(images)
    if own is None:
        return None
    front = images.root.process.get("ctty", {}).get("foreground", -1)
    groups = {p.pgid for p in images.processes if p.sid == images.root.sid}
    return front if front in groups else own


def _shell_job_root(images: RestoreImages):
    """The root of a shell job (dumped with --shell-job) in its shell's session;
    None for any other tree (one that leads its own session is no job)."""
    root = images.root
    if not images.dump.inventory.get("shell_job") or root.sid == root.pid:
        return None
    return root


def _gone_leaders(images: RestoreImages) -> set[int]:
    """Sessions and groups whose leader is no longer there (an orphan's: its parent
    started a session, forked it and exited), to be rebuilt through a helper. A
    leader alive outside the tree is the shell's of a shell job, joined as is; so
    is one in an outer PID namespace, which /proc shows as id 0, and one whose
    leader exited while other processes outside the tree stay in it: its id is
    taken, so no helper can have it (the tree joins the restorer's session)."""
    gone = {i for i in leaders_outside(images) if i > 0 and not proc.exists(i)}
    return gone - proc.sessions_and_groups_in_use() if gone else gone


def _clone_through_leader(
    creator: SyscallSession,
    kid,
    gone: set[int],
    remade: set[int],
    created: list[int],
    parent: Task | None = None,
):
    """`kid`, in a session or group whose leader is gone and that is not there
    yet: as CRIU does, a helper with the leader's PID starts the session (or
    group, then in the creator's session), clones the kid as its sibling
    (CLONE_PARENT), and exits; the session or group lives on in the kid (added to
    `remade`). The kid's parent reaps the helper: `parent`, or the restorer
    itself for the root (both are clones of the creator)."""
    leader = kid.sid if kid.sid in gone - remade else kid.pgid
    helper = _clone(creator, leader, parent is None, created)
    if kid.sid == leader:
        taskctl.setsid(helper)
    else:
        taskctl.setpgid(helper, 0)
    clone = _clone(helper, kid.pid, True, created)
    helper.call_exit(NR_exit_group, 0)  # the restorer, tracer and parent, reaps it here
    helper.close()
    if parent is not None:
        taskctl.reap(parent.session, leader)
        taskctl.discard_signal(parent.session, signal.SIGCHLD)
    created.remove(leader)
    remade.add(leader)
    return clone


def create_zombies(images: RestoreImages, tasks: dict[int, Task], created: list[int]) -> None:
    """Each zombie, cloned from its parent with its PID, in its session and group,
    then ended with its exit status (exit, or death by its signal): it stays a
    zombie until its parent reaps it."""
    for image in images.processes:
        for zombie in image.zombies:
            with inherit.cloning(tasks[image.pid], None):
                s = _clone(tasks[image.pid].session, zombie["pid"], False, created)
            if zombie["sid"] == zombie["pid"]:
                taskctl.setsid(s)
            elif zombie["pgid"] != image.pgid and zombie["pgid"] in (zombie["pid"], *tasks):
                taskctl.setpgid(s, 0 if zombie["pgid"] == zombie["pid"] else zombie["pgid"])
            status = zombie["exit_status"]
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                taskctl.sigaction(s, sig, 0, 0, 0, 0)  # its default action
                resource.prlimit(zombie["pid"], resource.RLIMIT_CORE, (0, 0))  # no core file
                s.die_of(sig)
            else:
                s.call_exit(NR_exit_group, os.WEXITSTATUS(status))
            s.close()


def _clone(creator: SyscallSession, pid: int, clone_parent: bool, created: list[int]):
    """clone3 a new process with `pid` from `creator`; a session on it."""
    flags = abi.CLONE_PARENT if clone_parent else 0
    exit_signal = 0 if clone_parent else signal.SIGCHLD  # CLONE_PARENT inherits it
    return clone_task(creator, flags, pid, exit_signal, created)


def _join_groups(
    images: RestoreImages, tasks: dict[int, Task], job: int | None, remade: set[int]
) -> None:
    """Process groups: leaders first, then members (same session required), also of
    a group whose leader is gone that a helper started again (`remade`). The shell
    job's group (`job`) is the restorer's, which the root has from its clone."""
    root_group = os.getpgid(images.root.pid) if job is not None else None
    for image in images.processes:
        if image.pgid == job:
            if os.getpgid(image.pid) != root_group:
                taskctl.setpgid(tasks[image.pid].session, root_group)
        elif image.pgid == image.pid and image.sid != image.pid:
            taskctl.setpgid(tasks[image.pid].session, 0)
    for image in images.processes:
        if image.pgid not in (image.pid, job) and (image.pgid in tasks or image.pgid in remade):
            taskctl.setpgid(tasks[image.pid].session, image.pgid)


def kill_and_reap(pids: list[int]) -> None:
    """SIGKILL each process and reap what we may (our children and tracees)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in reversed(pids):
        for _ in range(200):
            try:
                got, _ = os.waitpid(pid, os.WNOHANG | __WALL)
            except ChildProcessError:
                break
            if got:
                break
            time.sleep(0.005)


def restore_prctl(task: Task) -> None:
    """Parent-death signal, child subreaper, THP opt-out: process state that
    prctl sets and no other step covers."""
    state = task.image.process.get("prctl", {})
    s = task.session
    if state.get("pdeathsig"):
        taskctl.prctl(s, PR_SET_PDEATHSIG, state["pdeathsig"])
    if state.get("child_subreaper"):
        taskctl.prctl(s, taskctl.PR_SET_CHILD_SUBREAPER, 1)
    if state.get("thp_disable"):
        taskctl.prctl(s, taskctl.PR_SET_THP_DISABLE, 1)


def restore_cgroup(task: Task) -> None:
    """Back into its cgroup of the unified (v2) hierarchy, if it was not the
    restorer's own: a service stays in its unit's group, a job in its container's.
    A group that is gone, or refuses it, leaves it in the restorer's, and the
    log says so (another machine need not have the group)."""
    path = task.image.process.get("cgroup2")
    if path is None or path == cgroup.cgroup2_of(os.getpid()):
        return
    mount = cgroup.cgroup2_mount()
    if mount is None:
        return
    try:
        cgroup.move_to_cgroup2(mount, path, task.pid)
    except OSError as exc:
        log.warning(
            "process %d stays in the restorer's cgroup: cannot join %s (%s)",
            task.pid, path, exc.strerror or exc,
        )  # fmt: skip
