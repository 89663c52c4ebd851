"""Soft-dirty tracking, as Documentation/admin-guide/mm/soft-dirty.rst describes.

Reset: write "4" to /proc/PID/clear_refs. Query: bit 55 of each
/proc/PID/pagemap entry (read in bulk), or PAGEMAP_SCAN's PAGE_IS_SOFT_DIRTY
where the kernel has it. New and expanded VMAs read as soft-dirty, so memory
unmapped and mapped again at the same address is caught. Query and reset run
while the tree is frozen, as in CRIU; the pages themselves may be copied after
the thaw, because a page written after the reset is dirty again next time.
"""

from __future__ import annotations

from checkpointer.kernel import pagemap
from checkpointer.trackers.base import Tracker, VmaPages
from checkpointer.vmas import Vma


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"
    freezes_pre_dump = True

    def scan(self, pid: int, vmas: list[Vma], incremental: bool) -> dict[int, VmaPages]:
        result = {}
        with pagemap.Pagemap(pid) as pm:
            for vma in vmas:
                # Dirty pages among the data pages (a clean file page of a new,
                # soft-dirty VMA is in its file, not a page to copy).
                present, dirty = pm.data_and_soft_dirty(vma.start, vma.end, vma.anonymous)
                result[vma.start] = VmaPages(present, dirty if incremental else None)
        pagemap.clear_soft_dirty(pid)
        return result
