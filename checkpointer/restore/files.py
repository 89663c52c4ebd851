"""Step 2: files, directories, limits.

Each fd is opened by the restorer at its dumped flags and offset, then copied into
the task at its own number with pidfd_getfd (injected) and dup3, close-on-exec as
dumped. Then cwd and root, umask, personality, and rlimits (prlimit from outside).
"""

from __future__ import annotations

import os
import resource

from checkpointer.kernel import proc, taskctl
from checkpointer.restore.images import RestoreError
from checkpointer.restore.task import Task

# Flags that only matter when a file is created, or that we set ourselves.
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_CLOEXEC


class OpenFiles:
    """The open files of a restore. A kernel object several fds share (both ends
    of a pipe, a socket inherited by a child) is made once, in the restorer, and
    copied into every process that holds it; `objects` keeps those, by key."""

    def __init__(self, shell_job: bool, tree_fds: dict[int, list[dict]] | None = None) -> None:
        self.shell_job = shell_job
        self.objects: dict[str, int] = {}  # key -> our fd of the object
        # pid -> fd records of every process restored: who holds the other end.
        self.tree_fds = tree_fds or {}

    def shared(self, key: str, create) -> int:
        """Our fd for the object `key`, made by create() the first time."""
        if key not in self.objects:
            self.objects[key] = create()
        return self.objects[key]

    def close(self) -> None:
        for fd in self.objects.values():
            os.close(fd)
        self.objects.clear()


# fd record "type" -> module of that kind of object, with
#   open(files: OpenFiles, task: Task, record) -> int: a new fd of ours to copy in;
#   finish(files: OpenFiles, task: Task, record) -> None (optional): once every fd
#       of every process is in place (epoll watch lists, connections...).
KINDS: dict[str, object] = {}


def _register() -> None:
    from checkpointer.restore import pipe, socket

    KINDS.update({"pipe": pipe, "fifo": pipe, "socket": socket})


def restore_fds(task: Task, files: OpenFiles) -> None:
    for f in task.image.fds:
        kind = KINDS.get(f["type"])
        ours = kind.open(files, task, f) if kind else _open(task, f, files.shell_job)
        try:
            cloexec = f.get("cloexec", bool(f["flags"] & os.O_CLOEXEC))
            task.install_fd(ours, at=f["fd"], cloexec=cloexec)
        finally:
            os.close(ours)


def finish_fds(task: Task, files: OpenFiles) -> None:
    """The second pass of kinds that link fds together."""
    for f in task.image.fds:
        kind = KINDS.get(f["type"])
        if kind is not None and hasattr(kind, "finish"):
            kind.finish(files, task, f)


def _open(task: Task, f: dict, shell_job: bool) -> int:
    flags = (f["flags"] & ~_OPEN_ONLY) | os.O_CLOEXEC
    path = f["target"]
    if f["type"] == "tty":
        if not shell_job:
            raise RestoreError(f"fd {f['fd']} of process {task.pid} is a terminal: use --shell-job")
        path = _our_terminal()
        flags |= os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise RestoreError(f"fd {f['fd']} of process {task.pid}: {path}: {exc.strerror}") from None
    if f["type"] == "file" and not f["flags"] & os.O_APPEND:
        os.lseek(fd, f["pos"], os.SEEK_SET)
    return fd


def _our_terminal() -> str:
    for fd in (0, 1, 2):
        if os.isatty(fd):
            return os.ttyname(fd)
    raise RestoreError("--shell-job: the restorer has no terminal to give")


def restore_dirs_and_limits(task: Task) -> None:
    s = task.session
    mm, process = task.image.mm, task.image.process
    root = mm.get("root") or "/"
    cwd = mm.get("cwd") or "/"
    if root != "/":
        _enter(task, root)
        taskctl.chroot_here(s)
    _enter(task, cwd)
    if "umask" in process:
        taskctl.umask(s, process["umask"])
    taskctl.personality(s, process["personality"])
    for name, (soft, hard) in process["rlimits"].items():
        limits = tuple(resource.RLIM_INFINITY if v == -1 else v for v in (soft, hard))
        try:
            resource.prlimit(task.pid, proc.RLIMIT_NUMBERS[name], limits)
        except (OSError, ValueError) as exc:
            raise RestoreError(f"process {task.pid}: rlimit {name} {limits}: {exc}") from None


def _enter(task: Task, path: str) -> None:
    try:
        ours = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(f"process {task.pid}: directory {path}: {exc.strerror}") from None
    try:
        fd = task.install_fd(ours)
    finally:
        os.close(ours)
    taskctl.fchdir(task.session, fd)
    taskctl.close(task.session, fd)


_register()
