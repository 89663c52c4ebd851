"""Soft-dirty tracking, as Documentation/admin-guide/mm/soft-dirty.rst describes.

Reset: write "4" to /proc/PID/clear_refs. Query: bit 55 of each
/proc/PID/pagemap entry. New and expanded VMAs read as soft-dirty, so memory
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
                entries = pm.read(vma.start, vma.end)
                present = pagemap.data_runs(entries, vma.start)
                dirty = pagemap.soft_dirty_ranges(entries, vma.start) if incremental else None
                result[vma.start] = VmaPages(present, dirty)
        pagemap.clear_soft_dirty(pid)
        return result
