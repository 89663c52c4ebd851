"""The copy step of a pass: every memory owner's plan, from the target (or its
copy-on-write snapshot) into the dump's page writers.

An owner is a process's private memory ("pid-N") or a shared object ("shm-..."),
as the image format names them. Its plan (plan.py) says which ranges to copy and
which the parent chain already holds; files whose contents are stored whole
(deleted files, memfds: contents.py) are read from the file instead.
"""

from __future__ import annotations

from checkpointer import contents
from checkpointer.copier import PageCopier, Segment
from checkpointer.errors import CheckpointError
from checkpointer.images import Dump, DumpWriter
from checkpointer.images.pagewriter import PageStats
from checkpointer.kernel.pagemap import PAGE_SIZE, Pagemap, same_frames
from checkpointer.pageruns import Range, intersect, normalize, subtract
from checkpointer.plan import ParentPages, private_plan, shared_plans, split_same
from checkpointer.progress import Progress
from checkpointer.trackers import VmaPages
from checkpointer.vmas import Vma


def copy_memory(
    writer: DumpWriter,
    vmas: dict[int, list[Vma]],
    pages: dict[int, dict[int, VmaPages]],
    held: dict[int, list[Range]],
    parent: Dump | None,
    *,
    compare: bool,
    whole_files: dict[str, tuple],
    progress: bool,
    partial_ok: bool,
    readers: dict | None = None,
    same_as: dict[int, int] | None = None,
    shared: dict[str, list[Segment]] | None = None,
    files_copied: list[PageStats] | None = None,
) -> dict[str, int]:
    """Copy the pages of every process (`pages`: present and dirty, per VMA) and
    shared object, leaving out what `held` says the parent chain holds for each
    process. `compare`: compare pages with the parent's content (the full tracker).
    `whole_files`: owner -> where to read a whole file instead. Returns the copy's
    counts and times for the stats record. `same_as`: pid -> its parent in the
    tree, for a tree frozen until the copy ends: the pages a child still shares
    with its parent (one page frame) are recorded as the parent's, not copied.
    `shared`: the shared objects' plans as made when their memory was read (a
    snapshot's); planned here from `vmas` if None. `files_copied`: the stats of
    `whole_files` copied already (copy_whole_files, in a snapshot's window)."""
    owned = {f"pid-{pid}": ranges for pid, ranges in held.items()}
    plans = {
        f"pid-{pid}": private_plan(pid, vmas[pid], pages[pid], ranges)
        for pid, ranges in held.items()
    }
    same_owner = _share_with_parents(plans, same_as or {})
    plans.update(shared_plans(vmas) if shared is None else shared)
    for owner in whole_files:
        plans.pop(owner, None)
    segments = [seg for plan in plans.values() for seg in plan]
    scanned = sum(seg.end - seg.start for seg in segments)
    to_read = sum(seg.end - seg.start for seg in segments if seg.where == "data")
    meter = Progress(to_read // PAGE_SIZE, PAGE_SIZE, progress)
    copier = PageCopier(PAGE_SIZE, meter, partial_ok=partial_ok, readers=readers)
    counts = dict.fromkeys(
        (
            "pages_written",
            "pages_skipped_parent",
            "pages_zero",
            "pages_same",
            "bytes_raw",
            "bytes_compressed",
        ),  # fmt: skip
        0,
    )
    # Shared objects are compared with the parent whatever the tracker: writes
    # through other mappings (or write(2) to a memfd) escape every tracker.
    for owner in plans:
        if owner.startswith("shm-") and parent is not None:
            owned[owner] = parent.held_ranges(owner)
    try:
        for owner, plan in plans.items():
            page_writer = writer.open_pages(owner, same_owner.get(owner))
            parent_reader = (
                ParentPages(parent, owner, owned[owner], PAGE_SIZE)
                if (compare or owner.startswith("shm-")) and owned.get(owner)
                else None
            )
            copier.copy(page_writer, plan, parent_reader)
            ps = page_writer.close()
            _check_parent_runs(owner, page_writer.parent_ranges, owned, parent)
            _count(counts, ps)
        if files_copied is None:
            files_copied = copy_whole_files(writer, whole_files)
        for ps in files_copied:
            _count(counts, ps)
    finally:
        copier.close()
        meter.finish()
    return {
        "memdump_time": copier.times.memdump_us,
        "memwrite_time": copier.times.memwrite_us,
        "pages_scanned": scanned // PAGE_SIZE,
        **counts,
    }


def copy_whole_files(writer: DumpWriter, whole_files: dict[str, tuple]) -> list[PageStats]:
    """Copy the whole contents of each memfd and deleted file, read through the
    tree's fds and mappings: only while it is frozen are they those of the dump."""
    return [contents.copy_contents(writer, owner, source) for owner, source in whole_files.items()]


def _share_with_parents(plans: dict[str, list], same_as: dict[int, int]) -> dict[str, str]:
    """Split each child's plan where it maps the page frames its parent maps at the
    same addresses (a fork's memory neither has written since): those pages are
    recorded as the parent's, whose plan covers them. Returns owner -> the owner
    its "same" runs name. Page tables are compared only where the parent has
    pages too (a child that ran another program shares next to nothing)."""
    named: dict[str, str] = {}
    for pid, parent in same_as.items():
        owner, theirs = f"pid-{pid}", f"pid-{parent}"
        if owner not in plans or theirs not in plans:
            continue
        covered = normalize([(seg.start, seg.end) for seg in plans[theirs]])
        data = intersect([(seg.start, seg.end) for seg in plans[owner] if seg.where == "data"],
                         covered)  # fmt: skip
        if not data:
            continue
        with Pagemap(pid) as mine, Pagemap(parent) as its:
            same = same_frames(mine, its, data)
        if same:
            plans[owner] = split_same(plans[owner], same)
            named[owner] = theirs
    return named


def _check_parent_runs(
    owner: str, recorded: list[Range], owned: dict[str, list[Range]], parent: Dump | None
) -> None:
    """Never commit a reference the chain cannot resolve: restore would find out
    only after the source process is gone."""
    if not recorded:
        return
    have = owned.get(owner)
    if have is None:
        have = parent.held_ranges(owner) if parent else []
    if missing := subtract(recorded, have):
        start, end = missing[0]
        raise CheckpointError(
            f"internal error: {owner} pages {start:#x}-{end:#x} would be recorded as "
            f"in the parent, which does not hold them ({len(missing)} such ranges); "
            "nothing was committed and the next pass is a full one"
        )


def _count(counts: dict[str, int], ps) -> None:
    counts["pages_written"] += ps.written
    counts["pages_skipped_parent"] += ps.parent
    counts["pages_zero"] += ps.zero
    counts["pages_same"] += ps.same
    counts["bytes_raw"] += ps.bytes_raw
    counts["bytes_compressed"] += ps.bytes_compressed
