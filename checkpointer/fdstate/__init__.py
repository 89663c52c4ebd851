"""What a dump records about each kind of open file beyond its path, flags and
offset: one module per kind of kernel object (pipes, sockets, event fds...), each
with a `describe(pid, record) -> dict` whose fields are added to the fd record
while the tree is frozen. The restore side of each kind is in checkpointer/restore/.
"""

from __future__ import annotations

from collections.abc import Callable

# fd record "type" -> describe(pid, fd record) -> extra fields for the record.
DESCRIBERS: dict[str, Callable[[int, dict], dict]] = {}


def describe(pid: int, record: dict) -> dict:
    """The kind-specific fields of one fd record (none for plain files)."""
    fn = DESCRIBERS.get(record["type"])
    return fn(pid, record) if fn else {}


# The kinds register themselves in DESCRIBERS (anon, files); pipes and sockets here.
from checkpointer.fdstate import anon, files, pipe, socket  # noqa: E402

DESCRIBERS.update({"pipe": pipe.describe, "fifo": pipe.describe, "socket": socket.describe})
_ = (anon, files)
