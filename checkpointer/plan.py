"""Where each page of a dump goes: copied ("data"), held by the parent dump, or
the parent process's (a forked child's memory it still shares).

The trackers say which pages are present and which are dirty; these functions turn
that into Segments, in address order per memory owner, for the page copier.
"""

from __future__ import annotations

from collections.abc import Callable

from checkpointer.copier import Segment
from checkpointer.images import Dump
from checkpointer.kernel import proc
from checkpointer.pageruns import Range, intersect, normalize, subtract, window, within
from checkpointer.trackers import VmaPages
from checkpointer.vmas import Policy, Vma


def private_plan(
    pid: int, vmas: list[Vma], pages: dict[int, VmaPages], parent_held: list[Range]
) -> list[Segment]:
    """Segments of one process's own memory, in address order.

    `parent_held`: what the parent chain holds for this same process (sorted ranges;
    empty for a process that is new or another one since the parent). A page the
    tracker calls clean is the parent's only if the parent holds it; otherwise it
    is copied. That keeps every chain resolvable whatever a tracker missed (a fork,
    a page populated while a new VMA was being registered).
    """
    plan: list[Segment] = []
    for vma in vmas:
        if vma.policy is Policy.WHOLE:
            plan.append(Segment(vma.start, vma.end, "data", pid, vma.start))
            continue
        if vma.policy is not Policy.PRIVATE:
            continue
        vp = pages[vma.start]
        theirs = within(parent_held, vma.start, vma.end)
        if vp.dirty is not None and vp.present == theirs:
            # The common case of a chain: the parent holds just the present pages.
            # (One C-level comparison spares two walks of thousands of runs.)
            data = normalize(vp.dirty)
            held = subtract(vp.present, data)
        else:
            data = _to_copy(vp, theirs)
            # Present pages that were not written are the parent's if it has them.
            held = [] if vp.dirty is None else subtract(intersect(vp.present, theirs), data)
        plan.extend(_merged(pid, data, held))
    return plan


def data_segments(
    pid: int, vmas: list[Vma], pages: dict[int, VmaPages], parent_held: list[Range]
) -> list[Segment]:
    """The "data" segments of private_plan (the same ones), without working out the
    parent's: those are one per run of present pages, most of its time (a capture
    of the pages to copy in the frozen window needs only these)."""
    segs: list[Segment] = []
    for vma in vmas:
        if vma.policy is Policy.WHOLE:
            segs.append(Segment(vma.start, vma.end, "data", pid, vma.start))
        elif vma.policy is Policy.PRIVATE:
            theirs = window(parent_held, vma.start, vma.end)
            segs += [Segment(s, e, "data", pid, s) for s, e in _to_copy(pages[vma.start], theirs)]
    return segs


def _to_copy(vp: VmaPages, theirs: list[Range]) -> list[Range]:
    """A VMA's pages to copy: all present ones, or, with dirty information, the
    dirty ones (even if they were not present a moment ago) and the present ones
    the parent does not hold (`theirs`: what it holds around the VMA)."""
    if vp.dirty is None:
        return vp.present
    return normalize(vp.dirty + subtract(vp.present, theirs))


def _merged(pid: int, data: list[Range], held: list[Range]) -> list[Segment]:
    """Data and parent segments in address order: two sorted, disjoint lists
    merged in one pass (thousands of runs per GiB on the frozen path)."""
    out: list[Segment] = []
    append = out.append
    i, nd = 0, len(data)
    for hs, he in held:
        while i < nd and data[i][0] < hs:
            ds, de = data[i]
            append(Segment(ds, de, "data", pid, ds))
            i += 1
        append(Segment(hs, he, "parent", pid, hs))
    for ds, de in data[i:]:
        append(Segment(ds, de, "data", pid, ds))
    return out


def split_same(plan: list[Segment], same: list[Range]) -> list[Segment]:
    """`plan` with its data in `same` (sorted ranges) recorded as the parent
    process's pages ("same") instead of copied."""
    out: list[Segment] = []
    for seg in plan:
        inside = within(same, seg.start, seg.end)
        if seg.where != "data" or not inside:
            out.append(seg)
            continue
        pos = seg.start
        for s, e in inside:
            if s > pos:
                out.append(Segment(pos, s, "data", seg.pid, seg.vaddr + pos - seg.start))
            out.append(Segment(s, e, "same", seg.pid, seg.vaddr + s - seg.start))
            pos = e
        if pos < seg.end:
            out.append(Segment(pos, seg.end, "data", seg.pid, seg.vaddr + pos - seg.start))
    return out


def mapped_data(pid: int, vma: Vma) -> list[Range] | None:
    """The offsets of the object mapped by a shared VMA of pid that hold data (None:
    unknown)."""
    return proc.mapped_file_data(pid, vma.start, vma.end, vma.offset, vma.offset + vma.size)


def shared_plans(
    vmas: dict[int, list[Vma]],
    data_ranges: Callable[[int, Vma], list[Range] | None] = mapped_data,
) -> dict[str, list[Segment]]:
    """Each shared object once, read through whichever process maps each part.

    `data_ranges(pid, vma)`: the object's offsets that hold data (None: unknown,
    copy all); the holes are recorded as zero pages, never read (reading a hole
    of shmem through /proc/PID/mem allocates it in the target)."""
    plans: dict[str, list[Segment]] = {}
    covered: dict[str, list[Range]] = {}
    for pid, pid_vmas in vmas.items():
        for vma in pid_vmas:
            owner = vma.shmem_owner
            if owner is None:
                continue
            span = [(vma.offset, vma.offset + vma.size)]
            todo = subtract(span, covered.get(owner, []))
            held = data_ranges(pid, vma) if todo else None
            for s, e in todo:
                data = [(s, e)] if held is None else intersect(held, [(s, e)])
                segs = [Segment(a, b, "data", pid, vma.start + (a - vma.offset)) for a, b in data]
                segs += [Segment(a, b, "zero", pid, 0) for a, b in subtract([(s, e)], data)]
                plans.setdefault(owner, []).extend(segs)
            covered[owner] = normalize(covered.get(owner, []) + span)
    return {owner: sorted(plan, key=lambda s: s.start) for owner, plan in plans.items()}


class ParentPages:
    """What the parent chain holds for one owner (a process or a shared object),
    for content comparison: `held` ranges, and which pages still equal them."""

    def __init__(self, parent: Dump, owner: str, held: list[Range], page_size: int) -> None:
        self.parent = parent
        self.owner = owner
        self.held = held  # what the chain holds for this same owner
        self.page_size = page_size
        self._zeros = b""

    def unchanged(self, start: int, data: memoryview) -> list[Range]:
        """The ranges of [start, start + len(data)) whose bytes equal what the chain
        holds there. Compared in place (bytes.startswith at an offset is a memcmp
        between the decompressed frame and `data`): a shared object is compared
        whole on every pass, and copying both sides cost more than the compare."""
        end = start + len(data)
        same: list[Range] = []
        # Only the held ranges near this chunk: intersecting the whole list for every
        # chunk is quadratic when memory is fragmented into thousands of runs.
        for hs, he in within(self.held, start, end):
            for lo, hi, kind, view in self.parent.segment_views(self.owner, hs, he):
                if kind == "data":
                    frame, off = view
                elif kind == "zero":
                    frame, off = self._zero_bytes(hi - lo), 0
                else:
                    continue  # held, so never "missing"; if it were: copied
                new = data[lo - start : hi - start]
                if frame.startswith(new, off):  # the common case: nothing changed
                    same.append((lo, hi))
                    continue
                ps = self.page_size
                for p in range(0, hi - lo, ps):
                    if frame.startswith(new[p : p + ps], off + p):
                        same.append((lo + p, lo + p + ps))
        return normalize(same)

    def _zero_bytes(self, size: int) -> bytes:
        if len(self._zeros) < size:
            self._zeros = bytes(size)
        return self._zeros
