"""restore: images -> restorer -> kernel, one step per module.

    images.py   read and check the images; refuse before anything is built
    tree.py     every process with its PID, session and group (clone3 set_tid)
    memory.py   the address space, pages, mm fields and exe
    files.py    fds, cwd, root, umask, personality, rlimits
    threads.py  threads and their state; registers last
    signals.py  handlers, timers, pending signals
    creds.py    credentials, last of all

Every task is traced from its birth with PTRACE_O_EXITKILL, so a restorer that
dies (SIGKILL included) takes the half-built tree with it; any error kills what
was created and raises one line.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkpointer.errors import ImageError
from checkpointer.kernel import ptrace
from checkpointer.restore import creds, files, memory, pty, signals, threads, tree
from checkpointer.restore.images import load, preflight
from checkpointer.restore.task import Task
from checkpointer.restore.template import Template

log = logging.getLogger(__name__)
JOB_SIGNALS = {signal.SIGINT, signal.SIGQUIT}  # from a terminal to its foreground group


@dataclass
class RestoreRequest:
    images_dir: Path
    # False: the caller then waits for the root with wait_root (the CLI does), and a
    # shell job's ^C and ^\ are held for it from the moment the tree runs.
    detach: bool = True
    leave_stopped: bool = False  # every task stopped (SIGSTOP): `kill -CONT` resumes
    shell_job: bool = False  # terminals of the dump become the restorer's terminal
    pidfile: Path | None = None  # the root's PID is written here
    # A template holding an earlier dump's memory (restore/template.py): the root is
    # cloned from it and writes only what differs. The restore consumes it: killed,
    # but reaped by the caller's template.kill() (its exit need not delay the answer).
    template: Template | None = None

    def __post_init__(self) -> None:
        self.images_dir = Path(self.images_dir)


@dataclass
class RestoreResult:
    root_pid: int
    pids: list[int] = field(default_factory=list)
    restore_ms: float = 0.0
    bytes_written: int = 0  # page data written into the tree's private memory
    job_group: int | None = None  # a shell job's own group, given our terminal


# What a record of the wrong shape raises where restore reads it. The schemas check
# every record's common fields and the preflight what each object needs; whatever a
# damaged or hostile image still gets past them ends in one line, not a traceback
# (logged in full with -vv, for a bug).
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
             struct.error)  # fmt: skip


def restore(req: RestoreRequest) -> RestoreResult:
    """Bring the dump at req.images_dir back to life; the tree runs (or is stopped)."""
    try:
        return _restore(req)
    except MALFORMED as exc:
        log.debug("restore met a record it cannot read", exc_info=True)
        raise ImageError(
            f"a record restore cannot read ({type(exc).__name__}: {exc}); nothing was restored",
            str(req.images_dir),
        ) from None


def _restore(req: RestoreRequest) -> RestoreResult:
    started = time.monotonic()
    template, req.template = req.template, None
    try:
        images = load(str(req.images_dir), template.chain if template else None)
        if template is not None and template.pid in _ids_of(images):
            template.kill()  # it holds a PID the tree needs (another host's numbering)
            template = None
        preflight(images, req.shell_job)
        # Written now and renamed into place once the tree runs: a path that
        # cannot take it fails the restore before anything exists.
        pidfile = _PidFile(req.pidfile, images.root.pid) if req.pidfile else None
    except BaseException:
        if template is not None:
            template.kill()
        raise
    created: list[int] = []
    origin = template or tree.Seed()  # the root is cloned from it
    tasks: dict[int, Task] = {}
    shared = open_files = None
    try:
        shared = memory.SharedObjects(images)
        open_files = files.OpenFiles(
            req.shell_job, images, shared, {p.pid: p.fds for p in images.processes}
        )

        def build(task: Task) -> None:
            memory.rebuild(task, images.pieces.get(f"pid-{task.pid}", []), shared)

        for p in images.processes:
            for thread in p.threads:
                threads.check_xstate(origin.pid, thread)
        tasks = tree.create_tree(
            images,
            origin,
            created,
            build=build,
            on_setsid=lambda task: pty.take_terminal(open_files, task),
        )
        pty.set_foreground(open_files, tasks)
        tree.create_zombies(images, tasks, created)
        if template is None:  # a template goes once the tree runs: its exit takes time
            origin.kill()
            origin = None
        for task in tasks.values():
            _rebuild(task, shared, open_files, created)
        shared.every_process_has_them()
        for task in tasks.values():
            files.finish_fds(task, open_files)
            task.close_restorer_pidfd()
            creds.restore_creds(task)
        for task in tasks.values():
            memory.unmap_scratch(task)
            tree.restore_cgroup(task)
            threads.restore_scheduling(task)
            threads.set_registers(task)
        resized = req.shell_job and pty.give_shell_terminal(images)
        job_group = None
        if not req.detach and tree.shell_job_group(images) is not None:
            # The job, in our group, gets the terminal's ^C and ^\ with us as soon
            # as it runs: held until wait_root ignores them (else one before then
            # killed us, orphaning the job).
            signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        elif not req.detach and (own := tree.own_job_group(images)) is not None:
            front = tree.job_foreground(images)  # the job's own job, if it had it
            job_group = own if front is not None and pty.hand_terminal(front) else None
        _release(tasks, req.leave_stopped)
        if pidfile is not None:
            pidfile.commit()
        if resized:
            pty.tell_resized()
        if template is not None:
            template.send_kill()
            origin = None
    except BaseException:
        if pidfile is not None:
            pidfile.discard()
        for task in tasks.values():
            task.close_sessions()
        tree.kill_and_reap(created)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
        raise
    finally:
        if origin is not None:
            origin.kill()
        if shared is not None:
            shared.close()
        if open_files is not None:
            open_files.close()
    return RestoreResult(
        images.root.pid,
        [p.pid for p in images.processes],
        (time.monotonic() - started) * 1e3,
        sum(t.bytes_written for t in tasks.values()),
        job_group,
    )


def _ids_of(images) -> set[int]:
    """Every PID and thread id the restored tree takes."""
    ids = set()
    for p in images.processes:
        ids.update((p.pid, *p.tids, p.sid, p.pgid, *(z["pid"] for z in p.zombies)))
    return ids


def _rebuild(task: Task, shared, open_files, created) -> None:
    """Everything of one process but its memory (rebuilt as the tree is made),
    links between fds, credentials and registers, in dependency order."""
    files.restore_fds(task, open_files)
    files.restore_dirs_and_limits(task, shared.ghosts)
    signals.restore_process_signals(task)
    threads.create_threads(task, created)
    signals.restore_posix_timers(task)
    threads.restore_thread_state(task)
    tree.restore_prctl(task)


def _release(tasks: dict[int, Task], leave_stopped: bool) -> None:
    """Detach from every thread: the tree runs, or is stopped before it runs a
    single instruction (see _stop_before_running)."""
    for task in tasks.values():
        task.close_sessions()
        if threads.leader_had_exited(task):
            del task.threads[task.pid]
            ptrace.detach(task.pid)  # runs its exit(2) (threads.set_registers)
    # A process that was stopped (SIGSTOP, ^Z) when it was dumped stays stopped.
    stopped = {
        pid: t for pid, t in tasks.items() if leave_stopped or t.image.process["state"] == "T"
    }
    _stop_before_running(stopped)
    for task in tasks.values():
        if task.pid not in stopped:
            for tid in task.threads:
                ptrace.detach(tid)


def _stop_before_running(tasks: dict[int, Task]) -> None:
    """Leave the tree in an ordinary group-stop that `kill -CONT` ends, before it
    runs a single instruction: every signal held, SIGSTOP queued, detach; then
    the real masks back (ptrace.give_back_masks_in_group_stop)."""
    if not tasks:
        return
    masks = {tid: ptrace.get_sigmask(tid) for task in tasks.values() for tid in task.threads}
    for tid in masks:
        ptrace.set_sigmask(tid, ptrace.HOLD_ALL)
    for task in tasks.values():
        os.kill(task.pid, signal.SIGSTOP)
        for tid in task.threads:
            ptrace.detach(tid)
    ptrace.give_back_masks_in_group_stop(masks)


class _PidFile:
    """The root's PID, written beside `path` before the restore and renamed into
    place once the tree runs (a rename needs no space), or removed."""

    def __init__(self, path: Path, pid: int) -> None:
        self.path = path
        # A new file of a unique name (O_EXCL): whoever may write the directory
        # cannot have a planted link take root's write elsewhere.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, f"{pid}\n".encode())
        except OSError:
            self.discard()
            raise
        finally:
            os.close(fd)

    def commit(self) -> None:
        self.tmp.replace(self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def wait_root(pid: int, job_group: int | None = None) -> int:
    """Wait for the restored root (our child) to end; its exit status, shell style.

    A shell job restored into our process group (tree.shell_job_group) gets the
    terminal's ^C and ^\\ with us: as a shell does for its foreground job, we ignore
    them while it runs (or the job would lose its parent and, to the shell, end
    there), and die of the signal that ended it, so that the shell sees how it
    ended. A job given the terminal in its own group (`job_group`,
    pty.hand_terminal) gets them alone; we stand for it to the shell's job
    control (_wait_job_in_front)."""
    try:
        joined = os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        joined = False
    if joined:
        for sig in JOB_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # also drops one pending since the release
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
    if job_group is not None:
        status = _wait_job_in_front(pid, job_group)
    else:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        if joined or job_group is not None:
            _die_of(os.WTERMSIG(status))
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _wait_job_in_front(pid: int, job_group: int) -> int:
    """Wait for the root of a job whose group has our terminal, as its shell would:
    when it stops (^Z), take the terminal back and stop too, so that the shell
    sees it; continued in the foreground (`fg`: the terminal is ours again), give
    the terminal back to the job, and continue it; in the background (`bg`),
    continue it there. When it ends, the terminal is ours again."""
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # terminal changes from behind
    tty = os.open(pty.shell_terminal(), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        while True:
            _, status = os.waitpid(pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                return status
            _set_foreground(tty, os.getpgrp())
            _stop_as(os.WSTOPSIG(status))
            if os.tcgetpgrp(tty) == os.getpgrp():
                _set_foreground(tty, job_group)
            os.killpg(job_group, signal.SIGCONT)
    finally:
        _set_foreground(tty, os.getpgrp())
        os.close(tty)


def _stop_as(sig: int) -> None:
    """Stop by `sig`, the job's own stop signal (^Z: SIGTSTP), which the shell
    tells the user (bash's $? is 148 for it, 147 for SIGSTOP). In a group that has
    become orphaned, the kernel drops the terminal stop signals: we then go on,
    and so does the job, rather than both stopping with no one to continue them."""
    old = signal.signal(sig, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), sig)  # delivered, and stops us, as the call returns
    finally:
        signal.signal(sig, old)


def _set_foreground(tty: int, pgid: int) -> None:
    try:
        os.tcsetpgrp(tty, pgid)
    except OSError as exc:  # the group is gone, or the terminal is not ours any more
        log.debug("terminal foreground not set to %d: %s", pgid, exc)


def _die_of(sig: int) -> None:
    """End this process by `sig`, without a core file."""
    sys.stdout.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
