"""A process being restored: its image, and the injection sessions on its threads."""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass, field

from checkpointer.errors import TargetError
from checkpointer.images.resolve import Piece
from checkpointer.kernel import ptrace, taskctl
from checkpointer.kernel.inject import SyscallSession
from checkpointer.restore.images import ProcessImage, RestoreError


@dataclass
class Task:
    image: ProcessImage
    session: SyscallSession  # on the main thread; registers are set at the end
    threads: dict[int, SyscallSession] = field(default_factory=dict)
    scratch: tuple[int, int] | None = None  # (addr, size) of the scratch area in a gap
    pidfd: int | None = None  # fd number, inside the task, of a pidfd for the restorer
    # The task it was cloned from, whose rebuilt memory it starts with (None: the seed).
    cloned_from: Task | None = None
    vdso: dict[str, tuple[int, int]] | None = None  # where its vdso areas are, once rebuilt
    pieces: list[Piece] = field(default_factory=list)  # where its rebuilt pages came from
    bytes_written: int = 0  # of page data, into its memory (what it kept was not)

    def __post_init__(self) -> None:
        self.threads.setdefault(self.pid, self.session)

    @property
    def pid(self) -> int:
        """Its PID: the image's, but for a template's (restore/template.py)."""
        return self.session.tid

    def install_fd(self, our_fd: int) -> int:
        """Copy one of the restorer's fds into the task (pidfd_getfd from inside it),
        close-on-exec, at the lowest free number; returns that number. The open file
        description is shared, so its offset and flags are the ones set here."""
        return taskctl.take_fd(self.session, self._restorer_pidfd(), our_fd)

    def install_fds(self, fds: list[tuple[int, int, bool]]) -> None:
        """Copy each (our_fd, at, cloexec) of `fds` into the task at fd `at`, with
        close-on-exec as asked, in a few stops."""
        pidfd = self._restorer_pidfd()
        in_use = {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}
        taskctl.take_fds(self.session, pidfd, fds, in_use)

    def _restorer_pidfd(self) -> int:
        if self.pidfd is None:
            # Above every fd of the image, so restoring those never closes it.
            low = taskctl.pidfd_open(self.session, os.getpid())
            high = max([f["fd"] for f in self.image.fds], default=0) + 1
            _room_for_fds(self.pid, high + 1)
            self.pidfd = taskctl.dup_above(self.session, low, high)
        return self.pidfd

    def close_restorer_pidfd(self) -> None:
        if self.pidfd is not None:
            taskctl.close(self.session, self.pidfd)
            self.pidfd = None

    def close_sessions(self) -> None:
        for s in self.threads.values():
            s.close()


def _room_for_fds(pid: int, count: int) -> None:
    """A restored process starts with the restorer's RLIMIT_NOFILE (often a
    soft 1024) and gets its own back last (files.restore_dirs_and_limits); its
    fds may go higher (a server that raised its limit), so the limit is raised
    first, the hard one too if needed (CAP_SYS_RESOURCE)."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY:
            hard = max(hard, count)
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (count, hard))
        except (OSError, ValueError) as exc:
            raise RestoreError(
                f"process {pid}: its fds go up to {count - 2}, above the open-file "
                f"limit restore can give it ({exc})"
            ) from None


def clone_task(
    creator: SyscallSession, flags: int, tid: int, exit_signal: int, created: list[int]
) -> SyscallSession:
    """clone3 a process or thread with id `tid` (0: any) from `creator` (set_tid);
    once it reports its first stop (it is traced from birth), a session on it.
    `created` gets the id at once, so a failure after this point kills it too."""
    try:
        got = taskctl.clone3(creator, flags, tid, exit_signal)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise RestoreError(f"PID {tid} is taken; it must be free") from None
        raise
    created.append(got)
    stop = ptrace.wait_stop(got, 10.0)
    if stop.kind in ("exited", "killed"):
        raise TargetError(f"restored task {got} died at birth")
    session = SyscallSession(got, restore_regs=False, insn=creator.insn)
    session.open()
    return session
