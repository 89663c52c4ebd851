"""What the tool remembers about a target between runs, and the per-target lock.

Dirty tracking lives in the kernel (soft-dirty bits, uffd-wp protections) and
is reset by every pass. A reset whose dump never committed has thrown away
dirty information, so the next pass must not trust its parent. The state file
records which dump's pass last reset tracking; a pre-dump whose parent is not
that dump does a full pass instead (Firecracker's lesson: never discard dirty
information before the data it covers is safely written).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from checkpointer.errors import TargetError


def state_dir() -> Path:
    """Where tracking state and per-target locks live: /run/checkpointer for root;
    for another user (who may dump its own processes) its runtime directory, or
    its XDG state directory where it has none."""
    path = Path(os.environ.get("CHECKPOINTER_STATE_DIR") or _default_state_dir())
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/checkpointer")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    with suppress(OSError):
        if runtime and os.path.isabs(runtime) and os.stat(runtime).st_uid == os.geteuid():
            return Path(runtime) / "checkpointer"
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state_home) / "checkpointer"


@dataclass
class TrackState:
    pid: int
    start_time: int
    tracker: str
    reset_by: str | None = None  # dump_id of the committed dump whose pass reset tracking
    pending: str | None = None  # dump_id of a pass that reset tracking but has not committed
    extra: dict = field(default_factory=dict)  # tracker-specific (uffd fd number)

    def trusts(self, parent_dump_id: str | None, tracker: str) -> bool:
        """May a pass build on the dump `parent_dump_id` with this tracking state?"""
        return (
            parent_dump_id is not None
            and self.tracker == tracker
            and self.pending is None
            and self.reset_by == parent_dump_id
        )


def _path(pid: int) -> Path:
    return state_dir() / f"{pid}.json"


def load(pid: int, start_time: int) -> TrackState | None:
    try:
        data = json.loads(_path(pid).read_text())
        state = TrackState(**data)
    except (OSError, ValueError, TypeError):
        return None
    # A state file left by an earlier process with the same PID means nothing.
    return state if state.start_time == start_time else None


def save(state: TrackState) -> None:
    """Replace the state file atomically. Not fsynced: it describes kernel state of
    a live process, which a crash of the machine ends too; against a crash of the
    tool the rename is enough. (A pass saves it twice inside its frozen window.)"""
    path = _path(state.pid)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f)
    os.replace(tmp, path)


def forget(pid: int) -> None:
    _path(pid).unlink(missing_ok=True)


@contextmanager
def target_lock(pid: int) -> Iterator[None]:
    """One checkpointer run per target at a time."""
    fd = os.open(state_dir() / f"{pid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise TargetError(
                f"another checkpointer run (pid {holder}) is working on process {pid}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
