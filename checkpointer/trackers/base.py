"""The dirty-page tracker interface.

A tracker answers, for each private VMA of a process: which pages hold data now
(`present`), and which of them were written since the last reset (`dirty`,
None when it cannot tell, e.g. on a first pass or after tracking was lost).
Every scan also resets tracking, so the next scan reports only later writes.
The dumper copies dirty pages and records the other present pages as held by
the parent dump.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from checkpointer.pageruns import Range
from checkpointer.vmas import Vma

# Given by the caller (which owns the freezer): a context that holds one thread of
# the target in a ptrace stop and yields its tid.
StopThread = Callable[[], AbstractContextManager[int]]


@dataclass
class VmaPages:
    present: list[Range]
    dirty: list[Range] | None  # None: every present page counts as dirty


class ParsedOnDemand(Mapping[int, VmaPages]):
    """A scan's VmaPages by VMA start, each made from what the scan read when it is
    first looked at. What the kernel reports must be read at the instant (inside a
    frozen window); turning its raw entries into ranges need not: a freezing
    pre-dump has thawed the tree by the time its copy looks."""

    def __init__(self, makers: dict[int, Callable[[], VmaPages]]) -> None:
        self._starts = list(makers)
        self._makers = dict(makers)  # each dropped once used: it holds raw entries
        self._made: dict[int, VmaPages] = {}

    def __getitem__(self, start: int) -> VmaPages:
        pages = self._made.get(start)
        if pages is None:
            pages = self._made[start] = self._makers.pop(start)()
        return pages

    def __iter__(self) -> Iterator[int]:
        return iter(self._starts)

    def __len__(self) -> int:
        return len(self._starts)


class Tracker(ABC):
    name: str
    # Does a pre-dump need the tree frozen while this tracker scans and resets?
    freezes_pre_dump: bool = True
    # Does a pass that does not freeze still stop its processes, one at a time, to
    # put tracking into them (attach, prepare)?
    stops_running: bool = False
    # Does the copier have to compare page contents with the parent chain?
    compares_content: bool = False
    # Does scan() take the target's mmap lock only for reading once prepare() ran?
    # Then a walk of smaps (which holds it for reading) can run beside the scan.
    scan_only_reads: bool = False

    def needs_stop(self, pid: int, vmas: list[Vma]) -> bool:
        """Must a running process be stopped for prepare()? `vmas`: as read a moment
        ago, while it ran."""
        return False

    def prepare(self, pid: int, vmas: list[Vma]) -> None:  # noqa: B027 (optional hook)
        """The part of the next scan() that takes the target's mmap lock for
        writing (registrations), done first. `vmas` are the process's VMAs of this
        instant: it is frozen, or stopped for this call (needs_stop). The caller
        skips it for a running process that needs no stop."""

    @abstractmethod
    def scan(self, pid: int, vmas: list[Vma], incremental: bool) -> Mapping[int, VmaPages]:
        """Pages of each PRIVATE vma (keyed by vma.start); resets tracking for pid."""

    def attach(self, pid: int, state: dict, stop: StopThread) -> dict:
        """Make sure tracking is set up for pid; return state to keep between runs.
        `with stop() as tid:` gives a thread of pid in a ptrace stop, if needed."""
        return {}

    def own_traces(self, state: dict) -> tuple[set[int], set[str]]:
        """The fds and smaps VmFlags this tracker put into a target (with `state`
        from an earlier run): the target's records must not show them."""
        return set(), set()

    def inherited_traces(self, pid: int, state: dict, states: dict[str, dict]) -> set[int]:
        """fds of pid, besides its own trace (`state`), that are another tracked
        process's trace inherited through fork (`states`: by pid string; an entry
        for pid itself may be a former process's with its PID, and is skipped)."""
        return set()

    def drop_inherited(self, pid: int, fds: set[int], stop: StopThread) -> None:  # noqa: B027
        """Close such inherited fds in pid: they are the tool's, not the program's."""

    def lost(self, pid: int, state: dict) -> str | None:
        """Why tracking state from an earlier run cannot be trusted, or None."""
        return None

    def untrack(self, pid: int, state: dict, stop: StopThread) -> None:  # noqa: B027
        """Remove every trace of tracking from the target."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the tool holds (file descriptors)."""
