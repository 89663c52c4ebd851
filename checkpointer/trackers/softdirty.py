"""Soft-dirty tracking, as Documentation/admin-guide/mm/soft-dirty.rst describes.

Reset: write "4" to /proc/PID/clear_refs. Query: bit 55 of each
/proc/PID/pagemap entry (read in bulk), or PAGEMAP_SCAN's PAGE_IS_SOFT_DIRTY
where the kernel has it. New and expanded VMAs read as soft-dirty, so memory
unmapped and mapped again at the same address is caught. Query and reset run
while the tree is frozen, as in CRIU; the pages themselves may be copied after
the thaw, because a page written after the reset is dirty again next time. So
may the query's raw entries be worked out into ranges (ParsedOnDemand).
"""

from __future__ import annotations

from collections.abc import Callable

from checkpointer.kernel import pagemap
from checkpointer.trackers.base import ParsedOnDemand, Tracker, VmaPages
from checkpointer.vmas import Vma

# Raw pagemap entries (8 bytes a page of address space) a pass keeps to work out
# after the thaw; past this, a VMA's are worked out at once, inside the window,
# so the tool's memory stays bounded whatever the target reserves.
KEEP_ENTRIES_BYTES = 64 << 20


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"
    freezes_pre_dump = True

    def __init__(self) -> None:
        self._kept = 0  # bytes of raw entries kept by this pass's scans

    def scan(self, pid: int, vmas: list[Vma], incremental: bool) -> ParsedOnDemand:
        found = {}
        with pagemap.Pagemap(pid) as pm:
            for v in vmas:
                size = (v.end - v.start) // pagemap.PAGE_SIZE * pagemap.ENTRY_SIZE
                keep = self._kept + size <= KEEP_ENTRIES_BYTES
                self._kept += size if keep else 0
                # Dirty pages among the data pages (a clean file page of a new,
                # soft-dirty VMA is in its file, not a page to copy).
                found[v.start] = pm.data_and_soft_dirty_later(
                    v.start, v.end, v.anonymous, keep_entries=keep
                )
        pagemap.clear_soft_dirty(pid)
        # The pagemap entries were read before the reset; working them out into
        # ranges is left for the first look, after the thaw in a pre-dump.
        return ParsedOnDemand({start: _pages(later, incremental) for start, later in found.items()})


def _pages(later: Callable[[], tuple[list, list]], incremental: bool) -> Callable[[], VmaPages]:
    def make() -> VmaPages:
        present, dirty = later()
        return VmaPages(present, dirty if incremental else None)

    return make
