"""Pipes and FIFOs at restore.

A pipe with both ends in the tree is made anew (pipe2) at its dumped size, its
buffered bytes written back; every fd gets its own open of it (so O_NONBLOCK is
per fd, as dumped). A pipe with an end outside the tree (a shell's pipe into the
dumped program) is joined again if some process outside the tree still holds
it, so the program goes on reading from (or writing to) the same pipe, its
buffer as it is now; if nobody holds it any more, the program gets a pipe with
the dumped bytes whose other end is closed: the reader sees the bytes then end
of file, the writer EPIPE, as it would have had it run on.
A FIFO is opened again at its path; its dumped bytes are written back unless a
process outside the tree kept it open (then the FIFO still holds its bytes).
"""

from __future__ import annotations

import os
import stat

from checkpointer.kernel import sockets
from checkpointer.restore.images import ProcessImage, RestoreError

_OPEN = os.O_ACCMODE | os.O_NONBLOCK


def _ends_in_tree(files, pipe_id) -> set[str]:
    return {r["pipe_end"] for r in files.records_by("pipe_id").get(pipe_id, [])}


def _data(files, pipe_id) -> bytes:
    for r in files.records_by("pipe_id").get(pipe_id, []):
        if r.get("pipe_data"):
            return r["pipe_data"]
    return b""


def _fill(fd: int, size: int, data: bytes, where: str) -> None:
    try:
        sockets.set_pipe_size(fd, max(size, len(data)))
        os.set_blocking(fd, False)
        if data and os.write(fd, data) != len(data):
            raise OSError("short write")
    except OSError as exc:
        raise RestoreError(f"{where}: cannot refill the pipe: {exc}") from None


def open(files, task, record: dict) -> int:  # noqa: A001 (the kind interface)
    where = f"fd {record['fd']} of process {task.pid} ({record['target']})"
    if record["type"] == "fifo":
        # Our O_RDWR keeper is reader and writer: no open below blocks.
        files.shared(f"fifo-{record['pipe_id']}", lambda: _open_fifo(files, record, where))
        fd = os.open(record["target"], record["flags"] & _OPEN | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, not record["flags"] & os.O_NONBLOCK)
        return fd
    pipe_id = record["pipe_id"]
    key = f"pipe-{pipe_id}"
    ours = files.shared(key, lambda: _make_pipe(files, record, where))
    return os.open(f"/proc/self/fd/{ours}", record["flags"] & _OPEN | os.O_CLOEXEC)


def _make_pipe(files, record: dict, where: str) -> int:
    """An fd of ours (O_RDWR open) on the pipe the tree's fds of record's pipe open."""
    pipe_id = record["pipe_id"]
    link = f"pipe:[{pipe_id}]"
    if _ends_in_tree(files, pipe_id) != {"read", "write"}:
        for pid, fd in sockets.holders_of(link, exclude={os.getpid(), *files.tree_fds}):
            try:
                return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # gone meanwhile: try the next holder
    r, w = os.pipe2(os.O_CLOEXEC)
    _fill(w, record["pipe_size"], _data(files, pipe_id), where)
    try:
        # O_RDWR on a pipe makes a reader and a writer: the tree's ends open from it.
        ours = os.open(f"/proc/self/fd/{r}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.close(w)
    return ours


def _open_fifo(files, record: dict, where: str) -> int:
    path = record["target"]
    held = sockets.holders_of(path, exclude={os.getpid(), *files.tree_fds})
    keeper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    if not held:
        _fill(keeper, record["pipe_size"], _data(files, record["pipe_id"]), where)
    return keeper


def check(p: ProcessImage, record: dict, source_alive: bool = False) -> None:
    if record["type"] != "fifo":
        return
    where = f"fd {record['fd']} of process {p.pid} ({record['target']})"
    try:
        st = os.stat(record["target"])
    except OSError as exc:
        raise RestoreError(f"{where}: {exc.strerror}") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise RestoreError(f"{where}: no longer a FIFO")
