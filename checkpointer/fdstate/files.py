"""Files that exist only while open: a deleted file (a "ghost") has its contents
stored in the images, as does a memfd (whose fds restore reopen on the same
object its mappings use). Both name the page owner holding those contents,
`shm-DEV-INODE`, the owner a shared mapping of the same file uses.
Pseudo-terminals: a master (/dev/ptmx) records its pair's state and the bytes
queued in it, a slave its number."""

from __future__ import annotations

import logging
import os
import stat
import termios

from checkpointer import fdstate
from checkpointer.errors import UnsupportedObject
from checkpointer.kernel import memfd, proc, pty
from checkpointer.kernel.uffd import get_fd

log = logging.getLogger("checkpointer")
CAP_SYS_ADMIN = 21

# A deleted file bigger than this is refused (CRIU's --ghost-limit is 1 MiB).
GHOST_LIMIT = 64 << 20
DELETED = " (deleted)"


def object_owner(dev: int, ino: int) -> str:
    """The page owner of a file's contents: /proc/PID/maps's "MAJ:MIN" dev, in hex."""
    return f"shm-{os.major(dev):02x}{os.minor(dev):02x}-{ino}"


def linked_name(shown: str, st: os.stat_result | None, what: str) -> str | None:
    """Where a file /proc shows as deleted (`shown`, without " (deleted)") is still
    linked, or None: it is a ghost. /proc says "(deleted)" when the name the file
    was opened or mapped by is gone, even if the file has other links: glibc's
    sem_open makes each POSIX named semaphore under a temporary name, link()s it to
    its real name and unlinks the temporary one, so the creator maps
    "/dev/shm/sem.XXXXXX (deleted)" while the processes it shares the semaphore
    with map /dev/shm/sem.NAME. Restored as a ghost, it would be a copy of its own.
    The other name is looked for beside the old one (CRIU instead links the file
    back, with --link-remap, changing the file system until the restore)."""
    if st is None or st.st_nlink == 0 or shown.startswith("/memfd:") or shown == "/secretmem":
        return None  # (secret memory has no name anywhere: refused, vmas.unsupported)
    try:
        # The entries carry their inode: no stat but of a match (/dev/shm or /tmp may
        # hold thousands).
        with os.scandir(os.path.dirname(shown) or "/") as entries:
            for entry in entries:
                if entry.inode() != st.st_ino:
                    continue
                try:
                    there = os.stat(entry.path, follow_symlinks=False)
                except OSError:
                    continue
                if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
                    return entry.path
    except OSError:
        pass
    log.warning(
        "%s: the file is linked elsewhere (%d links), not beside its old name: "
        "restore gives the process a copy of its own",
        what,
        st.st_nlink,
    )
    return None


def ghost(identity: dict | None, what: str) -> dict:
    """The "ghost" field of a deleted regular file; refuses other deleted files."""
    if identity is None:
        raise UnsupportedObject(f"{what}: a deleted file that cannot be read")
    if not stat.S_ISREG(identity["mode"]):
        raise UnsupportedObject(f"{what}: a deleted file that is not a regular file: not supported")
    if identity["size"] > GHOST_LIMIT:
        raise UnsupportedObject(
            f"{what}: a deleted file of {identity['size']} bytes, over the "
            f"{GHOST_LIMIT >> 20} MiB limit for deleted files"
        )
    return {
        "owner": object_owner(identity["dev"], identity["ino"]),
        "size": identity["size"],
        "mode": stat.S_IMODE(identity["mode"]),
    }


def describe(pid: int, record: dict) -> dict:
    if record["target"] == "/dev/ptmx" and not record["flags"] & os.O_PATH:
        return {"pty_master": _pty_master(pid, record["fd"])}
    if not record["deleted"]:
        return {}
    target = record["target"]
    what = f"fd {record['fd']} of process {pid} ({target})"
    if target == "/secretmem" + DELETED:
        raise UnsupportedObject(
            f"{what}: secret memory (memfd_secret) cannot be dumped: no other process can read it"
        )
    if target.startswith("/memfd:") and record["stat"] is not None:
        st = record["stat"]
        ours = proc.open_fd_file(pid, record["fd"])
        try:
            seals = memfd.read_seals(ours)
        finally:
            os.close(ours)
        return {
            "memfd": {
                "owner": object_owner(st["dev"], st["ino"]),
                "name": target.removeprefix("/memfd:").removesuffix(DELETED),
                "size": st["size"],
                "seals": seals,
            }
        }
    return {"ghost": ghost(record["stat"], what)}


def _pty_master(pid: int, fd: int) -> dict:
    """The pair's settings, and the bytes queued in it (read and put back at once:
    the tree finds them there whether it is killed, left running, or the dump
    fails)."""
    ours = get_fd(pid, fd)
    try:
        state = pty.read_master(ours)
        try:
            queues = pty.read_queues(ours, _can_inject())
        except pty.InputRefused as why:
            raise UnsupportedObject(
                f"fd {fd} of process {pid} (/dev/ptmx, pts {state['index']}): {why}"
            ) from None
    finally:
        os.close(ours)
    if queues.statuses:
        log.warning(
            "fd %d of process %d (/dev/ptmx, pts %d): packet-mode status %#x was pending: "
            "a restore cannot report it again",
            fd, pid, state["index"], queues.statuses,
        )  # fmt: skip
    if queues.not_put_back:
        # Rare (the kernel let the writes that filled it past its limit); the
        # images have every byte, the tree has lost the last ones.
        log.warning(
            "fd %d of process %d (/dev/ptmx, pts %d): the last %d bytes of its full output "
            "queue did not fit back in it: the images have them, the running tree does not",
            fd, pid, state["index"], queues.not_put_back,
        )  # fmt: skip
    return {**state, "output": queues.output, "input": queues.input}


def _can_inject() -> bool:
    return bool(proc.read_creds(os.getpid())["cap_eff"] & 1 << CAP_SYS_ADMIN)


def describe_tty(pid: int, record: dict) -> dict:
    """A terminal fd: the pts number of a pseudo-terminal slave (whether its master
    is in the tree is decided once every fd is known: collect.check_terminals), and
    its settings: a terminal outside the tree (a shell job's) is the restoring
    shell's at restore, which takes them (the job may have made it raw, without
    echo: an editor, a pager, a REPL)."""
    number = record["target"].removeprefix("/dev/pts/")
    if not number.isdigit():
        return {}
    described: dict = {"index": int(number)}
    try:
        ours = get_fd(pid, record["fd"])
    except OSError:
        return {"pty": described}
    try:
        described.update(pty.read_settings(ours))
    except (OSError, termios.error):
        pass  # (a terminal hung up: EIO) nothing to give back
    finally:
        os.close(ours)
    return {"pty": described}


fdstate.DESCRIBERS["file"] = describe
fdstate.DESCRIBERS["tty"] = describe_tty
