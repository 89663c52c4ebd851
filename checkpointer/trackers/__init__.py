"""Dirty-page trackers: soft-dirty, uffd-wp, full; and how `auto` picks one."""

from __future__ import annotations

from checkpointer.errors import CheckpointError
from checkpointer.trackers.base import Tracker, VmaPages
from checkpointer.trackers.full import FullTracker
from checkpointer.trackers.softdirty import SoftDirtyTracker
from checkpointer.trackers.uffdwp import UffdWpTracker

TRACKERS = {"soft-dirty": SoftDirtyTracker, "uffd-wp": UffdWpTracker, "full": FullTracker}
CHOICES = ["auto", *TRACKERS]

__all__ = ["CHOICES", "TRACKERS", "Tracker", "VmaPages", "make_tracker", "pick_auto"]


def pick_auto() -> tuple[str, str]:
    """The tracker `auto` uses on this kernel, and why."""
    from checkpointer.kernel import features

    ok, why = features.probe_soft_dirty()
    if ok:
        return "soft-dirty", "the soft-dirty probe passed"
    ok2, why2 = features.probe_uffd_wp_async()
    if ok2:
        return "uffd-wp", f"no soft-dirty ({why}); userfaultfd async write-protect works"
    return "full", f"no soft-dirty ({why}) and no uffd-wp ({why2}): content comparison"


def make_tracker(name: str) -> Tracker:
    if name == "auto":
        name = pick_auto()[0]
    if name not in TRACKERS:
        raise CheckpointError(f"unknown tracker {name!r}; choose from {', '.join(CHOICES)}")
    if name == "soft-dirty":
        from checkpointer.kernel import features

        ok, why = features.probe_soft_dirty()
        if not ok:
            raise CheckpointError(f"soft-dirty tracking is not available: {why}")
    if name == "uffd-wp":
        from checkpointer.trackers.uffdwp import ensure_supported

        ensure_supported()
    return TRACKERS[name]()
