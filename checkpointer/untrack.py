"""Remove dirty tracking from a target and forget what the tool knew about it."""

from __future__ import annotations

import contextlib

from checkpointer import collect, trackstate
from checkpointer.errors import TargetError
from checkpointer.freezer import ProcessFreezer
from checkpointer.kernel import proc
from checkpointer.trackers import TRACKERS


def untrack(pid: int) -> str:
    """Undo tracking on pid; returns a sentence saying what was done."""
    proc.require_process(pid)
    with trackstate.target_lock(pid):
        state = trackstate.load(pid, collect.start_time(pid))
        if state is None:
            return f"process {pid}: no tracking state known; nothing to undo"
        if remove_traces(state):
            done = f"process {pid}: unregistered userfaultfd write-protection and closed its fd"
        else:
            done = f"process {pid}: forgot {state.tracker} tracking state"
        trackstate.forget(pid)
        return done


def remove_traces(state: trackstate.TrackState) -> bool:
    """Take what tracking put into the processes of `state` out of them (uffd-wp:
    its registrations and its fd; soft-dirty bits cost a target nothing). False
    if it put nothing there. The caller holds the target's lock."""
    tracker_class = TRACKERS.get(state.tracker)
    if tracker_class is None:
        return False
    tracker = tracker_class()
    removed = False
    for key, extra in state.extra.items():
        member = int(key)
        if not tracker.own_traces(extra)[0] or not _same_process(member, extra.get("start_time")):
            continue  # nothing there, or exited (its PID may be another process's now)
        # Unregistering a range splits any VMA it cuts into: the ranges must be
        # the VMAs of the instant, read with every thread stopped.
        with ProcessFreezer(member):
            stop = lambda m=member: contextlib.nullcontext(proc.live_tid(m))  # noqa: E731
            tracker.untrack(member, extra, stop)
        removed = True
    return removed


def _same_process(pid: int, start_time: int | None) -> bool:
    try:
        return start_time is None or collect.start_time(pid) == start_time
    except TargetError:
        return False
