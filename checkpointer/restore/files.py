"""Step 2: files, directories, limits.

Each fd is opened by the restorer at its dumped flags and offset, then copied into
the task at its own number with pidfd_getfd (injected) and dup3, close-on-exec as
dumped. Then cwd and root, umask, personality, and rlimits (prlimit from outside).
"""

from __future__ import annotations

import errno
import os
import resource
from typing import TYPE_CHECKING

from checkpointer.kernel import proc, taskctl
from checkpointer.restore import pty
from checkpointer.restore.images import DELETED, RestoreError, RestoreImages, procfs_task
from checkpointer.restore.task import Task

if TYPE_CHECKING:
    from checkpointer.restore.ghosts import GhostFiles
    from checkpointer.restore.memory import SharedObjects

# Flags that only matter when a file is created, or that we set ourselves.
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_CLOEXEC


class OpenFiles:
    """The open files of a restore. A kernel object several fds share (both ends
    of a pipe, a socket inherited by a child) is made once, in the restorer, and
    copied into every process that holds it; `objects` keeps those, by key."""

    def __init__(
        self,
        shell_job: bool,
        images: RestoreImages,
        shared: SharedObjects | None = None,
        tree_fds: dict[int, list[dict]] | None = None,
    ) -> None:
        self.shell_job = shell_job
        self.images = images
        # memfds (their fds reopen the object mappings use) and deleted files
        self.shared_memory = shared
        self.objects: dict[str, int] = {}  # key -> our fd of the object
        self.paths: dict[str, str] = {}  # key -> a path to open it (a pty's slave)
        self._done: set[str] = set()
        # pid -> fd records of every process restored: who holds the other end.
        self.tree_fds = tree_fds or {}
        self._indexes: dict[str, dict] = {}
        self._tids = {t for p in images.processes for t in p.tids}
        self._leaders = {p.pid for p in images.processes}

    def opens_later(self, record: dict) -> bool:
        """Is this fd a procfs file of a thread (not a process) of the tree? Threads
        are made after the fds of their process (threads.py): it is opened in
        finish_fds, once every thread is back."""
        tid = procfs_task(record["target"], self._tids)
        return tid is not None and tid not in self._leaders

    def records_by(self, field: str) -> dict:
        """The tree's fd records that have `field`, by its value (a list each), built
        once: asked once per pipe or socket, a scan of every record each time made
        a restore of 1,000 pipes and 8,000 fds take 2 s (and grows as the square)."""
        index = self._indexes.get(field)
        if index is None:
            index = self._indexes[field] = {}
            for pid, recs in self.tree_fds.items():
                for r in recs:
                    if field in r:
                        try:
                            index.setdefault(r[field], []).append(r)
                        except TypeError:  # a list or map where a name or id belongs
                            raise RestoreError(
                                f"fd {r.get('fd')} of process {pid}: bad {field} in the image"
                            ) from None
        return index

    def shared(self, key: str, create) -> int:
        """Our fd for the object `key`, made by create() the first time."""
        if key not in self.objects:
            self.objects[key] = create()
        return self.objects[key]

    def first_time(self, key: str) -> bool:
        """True the first time `key` is asked: for work done once per object."""
        if key in self._done:
            return False
        self._done.add(key)
        return True

    @staticmethod
    def description(task: Task, record: dict) -> str:
        """Key of the open file description behind an fd record: fds that share one
        (dup, fork) carry the same "ofd" id."""
        if "ofd" in record:
            return f"ofd {record['ofd']}"
        return f"fd {task.pid} {record['fd']}"

    def open_description(self, task: Task, record: dict) -> int:
        """A new fd of ours on the record's open file description: opened once for
        every fd sharing it (so they share its offset and flags), then dup'ed."""
        kind = KINDS.get(record["type"])

        def create() -> int:
            if kind is not None:
                return kind.open(self, task, record)
            return _open(task, record, self)

        if "ofd" not in record:
            return create()
        return os.dup(self.shared(self.description(task, record), create))

    def close(self) -> None:
        for fd in self.objects.values():
            os.close(fd)
        self.objects.clear()


# fd record "type" -> module of that kind of object, with
#   open(files: OpenFiles, task: Task, record) -> int: a new fd of ours to copy in;
#   finish(files: OpenFiles, task: Task, record) -> None (optional): once every fd
#       of every process is in place (epoll watch lists, connections...).
KINDS: dict[str, object] = {}


# fds opened by the restorer, then copied into the task together: one batch of
# injected calls instead of one to three stops each, and a bound on the fds the
# restorer holds at once (its own limit may be low).
FD_BATCH = 64


def restore_fds(task: Task, files: OpenFiles) -> None:
    pending: list[tuple[int, int, bool]] = []  # (our fd, its number there, cloexec)
    try:
        for f in task.image.fds:
            if files.opens_later(f):
                continue
            pending.append((files.open_description(task, f), f["fd"], _cloexec(f)))
            if len(pending) == FD_BATCH:
                _install_all(task, pending)
        _install_all(task, pending)
    finally:
        for ours, _, _ in pending:
            os.close(ours)


def _install_all(task: Task, pending: list[tuple[int, int, bool]]) -> None:
    try:
        task.install_fds(pending)
    except OSError as exc:
        raise RestoreError(f"process {task.pid}: cannot install {exc}") from None
    for ours, _, _ in pending:
        os.close(ours)
    pending.clear()


def _cloexec(f: dict) -> bool:
    return f.get("cloexec", bool(f["flags"] & os.O_CLOEXEC))


def _install(task: Task, files: OpenFiles, f: dict) -> None:
    pending = [(files.open_description(task, f), f["fd"], _cloexec(f))]
    try:
        _install_all(task, pending)
    finally:
        for ours, _, _ in pending:
            os.close(ours)


def finish_fds(task: Task, files: OpenFiles) -> None:
    """The fds restore_fds left for later; the second pass of kinds that link fds
    together; then the file locks."""
    for f in task.image.fds:
        if files.opens_later(f):
            _install(task, files, f)
    for f in task.image.fds:
        kind = KINDS.get(f["type"])
        if kind is not None and hasattr(kind, "finish"):
            kind.finish(files, task, f)
    for f in task.image.fds:
        for lock in f.get("locks", []):
            _take_lock(task, files, f, lock)


def _take_lock(task: Task, files: OpenFiles, f: dict, lock: dict) -> None:
    """A lock the process held through fd f, taken again by it, without waiting:
    flock and OFD locks once per open file description (the fds that share it
    share them), POSIX locks by each process that held them."""
    if lock["kind"] != "posix" and not files.first_time(
        f"{lock['kind']} {files.description(task, f)} {lock['start']}"
    ):
        return
    try:
        if lock["kind"] == "flock":
            taskctl.flock(task.session, f["fd"], lock["write"])
        else:
            end = lock["end"]
            length = 0 if end is None else end - lock["start"] + 1
            taskctl.set_record_lock(task.session, f["fd"], lock["kind"] == "ofd",
                                    lock["write"], lock["start"], length)  # fmt: skip
    except OSError as exc:
        held = exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
        raise RestoreError(
            f"fd {f['fd']} of process {task.pid} ({f['target']}): its {lock['kind']} lock "
            + ("is held by another process now" if held else f"failed: {exc.strerror}")
        ) from None


def _open(task: Task, f: dict, files: OpenFiles) -> int:
    flags = (f["flags"] & ~_OPEN_ONLY) | os.O_CLOEXEC
    if f["type"] == "file":
        # A regular file opened with O_TMPFILE keeps it (and its O_DIRECTORY) in
        # its flags; reopening the recreated ghost by name needs neither.
        flags &= ~os.O_TMPFILE
    path = f["target"]
    if "ghost" in f and files.shared_memory is not None:
        path = files.shared_memory.ghosts.path(f["ghost"], path.removesuffix(DELETED))
    elif "memfd" in f and files.shared_memory is not None:
        path = f"/proc/self/fd/{files.shared_memory.fd(f['memfd']['owner'])}"
    if "pty_master" in f:
        return pty.open_master(files, f)
    if f["type"] == "tty":
        index = f.get("pty", {}).get("index")
        if f["target"] == "/dev/tty":  # the process's controlling terminal
            index = task.image.process.get("ctty", {}).get("index")
        if pty.is_own(files.images, index):
            return pty.open_slave(files, index, flags)
        if not files.shell_job:
            raise RestoreError(f"fd {f['fd']} of process {task.pid} is a terminal: use --shell-job")
        path = pty.shell_terminal()
        flags |= os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise RestoreError(f"fd {f['fd']} of process {task.pid}: {path}: {exc.strerror}") from None
    if "memfd" in f and files.shared_memory is not None:
        files.shared_memory.used(f["memfd"]["owner"])
    if f["type"] == "file" and not f["flags"] & (os.O_APPEND | os.O_PATH):  # ghosts, memfds
        os.lseek(fd, f["pos"], os.SEEK_SET)
    return fd


def restore_dirs_and_limits(task: Task, ghosts: GhostFiles) -> None:
    s = task.session
    mm, process = task.image.mm, task.image.process
    root = mm.get("root") or "/"
    cwd = mm.get("cwd") or "/"
    if cwd.endswith(DELETED):  # removed under it: entered, then removed again
        cwd = ghosts.directory(cwd.removesuffix(DELETED))
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


def _register_kinds() -> None:
    from checkpointer.restore import anon, pipe, socket

    KINDS.update({"anon": anon, "pipe": pipe, "fifo": pipe, "socket": socket})


_register_kinds()
