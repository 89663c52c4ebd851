"""No kernel help: every present page is a candidate, and the copier stores only
the pages whose contents differ from what the parent chain holds, so images
stay incremental on any kernel. Nothing to reset, so no freeze for pre-dumps."""

from __future__ import annotations

from checkpointer.kernel import pagemap
from checkpointer.trackers.base import Tracker, VmaPages
from checkpointer.vmas import Vma


class FullTracker(Tracker):
    name = "full"
    freezes_pre_dump = False
    compares_content = True
    scan_only_reads = True

    def scan(self, pid: int, vmas: list[Vma], incremental: bool) -> dict[int, VmaPages]:
        with pagemap.Pagemap(pid) as pm:
            return {
                vma.start: VmaPages(pm.data_runs(vma.start, vma.end, vma.anonymous), None)
                for vma in vmas
            }
