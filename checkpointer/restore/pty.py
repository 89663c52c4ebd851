"""Pseudo-terminals of the tree (their master is in it): each pair comes back as a
new pair with the dumped termios, window size, lock, packet mode and queued bytes
(output for the master to read, input for the slave's readers); a slave fd opens the new
slave, a master fd shares the new master. A session leader whose controlling
terminal was such a slave takes the new one before its session's other processes
are created (they inherit it), and the terminal gets its foreground group back.

A shell job's terminal (outside the tree) is the restorer's: it takes the settings
the job's had at the dump, and the job is told if its window size changed."""

from __future__ import annotations

import logging
import os
import signal
import termios
from typing import TYPE_CHECKING

from checkpointer.kernel import pty, taskctl
from checkpointer.restore.images import RestoreError, RestoreImages
from checkpointer.restore.task import Task

if TYPE_CHECKING:
    from checkpointer.restore.files import OpenFiles


log = logging.getLogger("checkpointer")


def shell_terminal() -> str:
    """The restorer's terminal, which --shell-job gives the job's terminal fds."""
    for fd in (0, 1, 2):
        if os.isatty(fd):
            return os.ttyname(fd)
    raise RestoreError("--shell-job: the restorer has no terminal to give")


def hand_terminal(pgid: int) -> bool:
    """--shell-job: make process group `pgid` (the job's own) our terminal's
    foreground, if we are in it; whether it was done."""
    try:
        fd = os.open(shell_terminal(), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, RestoreError):
        return False
    try:
        if os.tcgetpgrp(fd) != os.getpgrp():
            return False
        os.tcsetpgrp(fd, pgid)
        return True
    except OSError as exc:
        log.info("--shell-job: the terminal stays ours: %s", exc)
        return False
    finally:
        os.close(fd)


def give_shell_terminal(images: RestoreImages) -> bool:
    """--shell-job: our terminal takes the settings the job's had at the dump (a
    vim, less or REPL made it raw, without echo; the restoring shell has set it
    back to its own), if we are in its foreground: the job then is too (it joins
    our group, tree.shell_job_group, or is given it, hand_terminal), and a
    background process may not change it.
    True if its window size is not the dumped one (tell_resized, once the tree
    runs)."""
    dumped = next(
        (f["pty"] for p in images.processes for f in p.fds
         if f["type"] == "tty" and "termios" in f.get("pty", {})
         and not is_own(images, f["pty"]["index"])),
        None,
    )  # fmt: skip
    if dumped is None:
        return False
    fd = os.open(shell_terminal(), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        try:
            foreground = os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:  # ENOTTY: not our controlling terminal
            foreground = False
        if not foreground:
            log.info("--shell-job: not in the foreground of our terminal; its settings kept")
            return False
        pty.set_termios(fd, dumped["termios"])
        return pty.window_size(fd) != dumped["winsize"]
    except (OSError, termios.error) as exc:
        raise RestoreError(f"--shell-job: cannot set our terminal as the job's: {exc}") from None
    finally:
        os.close(fd)


def tell_resized() -> None:
    """SIGWINCH to our terminal's foreground group, as the kernel sends it for a
    new window size: the shell job's (ours, if it joined it; that of the job's own
    job, hand_terminal), whose window is not the size it was at the dump."""
    fd = os.open(shell_terminal(), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        os.killpg(os.tcgetpgrp(fd), signal.SIGWINCH)
    except OSError as exc:  # the terminal changed hands meanwhile
        log.debug("no SIGWINCH sent: %s", exc)
    finally:
        os.close(fd)


def masters(images: RestoreImages) -> dict[int, dict]:
    """pts number -> dumped state of each pair whose master the tree holds."""
    return {
        f["pty_master"]["index"]: f["pty_master"]
        for p in images.processes
        for f in p.fds
        if "pty_master" in f
    }


def is_own(images: RestoreImages, index: int | None) -> bool:
    return index is not None and index in masters(images)


def pair(files: OpenFiles, index: int) -> tuple[int, str]:
    """(our master fd, slave path) of the new pair standing for pts `index`."""
    key = f"pty {index}"
    if key not in files.objects:
        state = masters(files.images)[index]
        files.objects[key], files.paths[key], left = pty.new_pair(state, index)
        if files.paths[key] != f"/dev/pts/{index}":  # taken meanwhile
            log.warning("pts %d is taken: the tree's terminal is %s now", index, files.paths[key])
        if left:  # an image queueing more than a pair holds
            log.warning("pts %d: the last %d bytes of its queued output did not fit", index, left)
    return files.objects[key], files.paths[key]


def open_master(files: OpenFiles, record: dict) -> int:
    master, _ = pair(files, record["pty_master"]["index"])
    return os.dup(master)


def open_slave(files: OpenFiles, index: int, flags: int) -> int:
    _, path = pair(files, index)
    return os.open(path, flags | os.O_NOCTTY)


def take_terminal(files: OpenFiles, task: Task) -> None:
    """A new session leader takes its controlling terminal, if the tree's own."""
    ctty = task.image.process.get("ctty")
    if ctty and is_own(files.images, ctty["index"]):
        _in_task(files, task, ctty["index"], pty.take_as_controlling)


def set_foreground(files: OpenFiles, tasks: dict[int, Task]) -> None:
    """Each own terminal's foreground process group, once the groups exist (only
    a process of the terminal's session may set it: its leader does)."""
    for task in tasks.values():
        ctty = task.image.process.get("ctty")
        if task.image.sid != task.pid or not ctty or not is_own(files.images, ctty["index"]):
            continue
        if (pgid := ctty["foreground"]) > 0:
            _in_task(files, task, ctty["index"],
                     lambda s, fd, pgid=pgid: pty.set_foreground_in(s, fd, pgid))  # fmt: skip


def _in_task(files: OpenFiles, task: Task, index: int, action) -> None:
    """action(session, fd) with the new slave open at fd in the task, which is
    closed again, with the task's pidfd: its memory and fds are replaced later."""
    ours = open_slave(files, index, os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = task.install_fd(ours)
    finally:
        os.close(ours)
    action(task.session, fd)
    taskctl.close(task.session, fd)
    task.close_restorer_pidfd()
