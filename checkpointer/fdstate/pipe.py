"""Pipes and FIFOs at dump: which pipe an fd is an end of, its size, and the bytes
buffered in it (read with tee, so the pipe keeps them)."""

from __future__ import annotations

import os

from checkpointer.errors import TargetError
from checkpointer.kernel import sockets


def describe(pid: int, record: dict) -> dict:
    """pipe_id (the pipe's inode; a FIFO's "dev:inode"), pipe_end ("read" or "write"),
    pipe_size, and pipe_data on read ends."""
    end = "write" if record["flags"] & os.O_ACCMODE == os.O_WRONLY else "read"
    if record["type"] == "fifo":
        pipe_id = f"{record['stat']['dev']}:{record['stat']['ino']}"
        if record["flags"] & os.O_ACCMODE == os.O_RDWR:
            end = "both"
    else:
        pipe_id = int(record["target"][len("pipe:[") : -1])
    try:
        size, data = sockets.peek_pipe(pid, record["fd"], with_data=end != "write")
    except OSError as exc:
        raise TargetError(
            f"fd {record['fd']} of process {pid} ({record['target']}): "
            f"cannot read the pipe's buffer: {exc.strerror or exc}"
        ) from None
    fields = {"pipe_id": pipe_id, "pipe_end": end, "pipe_size": size}
    if end != "write":
        fields["pipe_data"] = data
    return fields
