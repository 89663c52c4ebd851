"""Remove dirty tracking from a target and forget what the tool knew about it."""

from __future__ import annotations

from checkpointer import collect, trackstate
from checkpointer.freezer import stopped_thread
from checkpointer.trackers.uffdwp import UffdWpTracker


def untrack(pid: int) -> str:
    """Undo tracking on pid; returns a sentence saying what was done."""
    with trackstate.target_lock(pid):
        state = trackstate.load(pid, collect.start_time(pid))
        if state is None:
            return f"process {pid}: no tracking state known; nothing to undo"
        done = f"process {pid}: forgot {state.tracker} tracking state"
        if state.tracker == "uffd-wp":
            tracker = UffdWpTracker()
            for key, extra in state.extra.items():
                tracker.untrack(int(key), extra, lambda pid=int(key): stopped_thread(pid))
            done = f"process {pid}: unregistered userfaultfd write-protection and closed its fd"
        # soft-dirty bits need no undoing: they cost the target nothing.
        trackstate.forget(pid)
        return done
