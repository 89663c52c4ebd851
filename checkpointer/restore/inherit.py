"""What a process keeps of the memory it was cloned with (part of step 3).

Each process is cloned from its parent once the parent's memory is rebuilt, so
it starts with a copy-on-write image of it, as it did when it was forked. Every
process is dumped whole, so rebuilding a child from its own pages alone would
give it a private copy of each page it shared with its parent: a server with
four workers sharing 100 MB would need 400 MB after restore. Instead, as CRIU
does, a child keeps each private mapping that its parent's image has too, with
the same range, protection, backing and flags; then only the pages that differ
from its parent's are written, and those its parent holds and it does not are
dropped (MADV_DONTNEED: zeros again for anonymous memory, the file's bytes for
a private file mapping).

Both processes' memory equals their images, so comparing images is enough:
a page neither image holds is zeros, or the file, in both. A child that keeps
little (one that ran another program) is cloned with its parent's other large
mappings marked MADV_DONTFORK meanwhile (cloning()).
"""

from __future__ import annotations

import bisect
import contextlib

from checkpointer.images.resolve import Piece
from checkpointer.kernel import taskctl
from checkpointer.pageruns import Range, intersect, normalize, subtract
from checkpointer.restore.images import ProcessImage
from checkpointer.restore.task import Task

PRIVATE_KINDS = ("anon", "heap", "stack", "file-private")
# Fields that must be equal for a mapping to be the same one in both processes.
SAME = ("start", "end", "prot", "kind", "path", "offset", "vmflags", "ghost", "shmem")
# A fork does not copy a MADV_DONTFORK mapping ("dc"), and gives a
# MADV_WIPEONFORK one ("wf") fresh zeros: nothing of either is shared.
NOT_INHERITED = ("dc", "wf")
MADV_DONTFORK, MADV_DOFORK = 10, 11
# Smaller mappings cost less to copy at a clone than two injected madvise calls.
DONTFORK_AT_LEAST = 1 << 20


def kept_mappings(image: ProcessImage, source: ProcessImage | None) -> list[dict]:
    """The mappings of `image` it keeps from the process it was cloned from
    (whose image is `source`; None: the seed, whose memory is nobody's)."""
    if source is None:
        return []
    theirs = {v["start"]: v for v in source.vmas}
    kept = []
    for vma in image.vmas:
        if vma["kind"] not in PRIVATE_KINDS or any(f in vma["vmflags"] for f in NOT_INHERITED):
            continue
        other = theirs.get(vma["start"])
        if other is not None and all(vma.get(k) == other.get(k) for k in SAME):
            kept.append(vma)
    return kept


def pages_to_drop(kept: list[Range], own: list[Piece], source: list[Piece]) -> list[Range]:
    """The pages of the kept mappings that the source holds and the process
    does not hold as data: its image says they are zeros (or the file's)."""
    theirs = normalize([(p.start, p.end) for p in source])
    ours = normalize([(p.start, p.end) for p in own if p.source is not None])
    return subtract(intersect(theirs, kept), ours)


def differing(own: list[Piece], source: list[Piece]) -> list[Piece]:
    """The parts of the data pieces `own` (in address order) that do not come from
    the very bytes `source`'s pieces come from at the same addresses (same pages
    file, same offset: a child's pages dumped as its parent's). Those are in
    the child already; only the rest needs comparing."""
    starts = [p.start for p in source]
    out: list[Piece] = []
    for piece in own:
        pos = piece.start
        i = max(bisect.bisect_right(starts, piece.start) - 1, 0)
        while pos < piece.end and i < len(source):
            theirs = source[i]
            i += 1
            if theirs.start >= piece.end:
                break
            lo, hi = max(pos, theirs.start), min(piece.end, theirs.end)
            if lo >= hi:
                continue
            same_bytes = theirs.off - theirs.start == piece.off - piece.start
            if theirs.source is piece.source and same_bytes:
                if lo > pos:
                    out.append(Piece(pos, lo, piece.source, piece.off + pos - piece.start))
                pos = hi
        if pos < piece.end:
            out.append(Piece(pos, piece.end, piece.source, piece.off + pos - piece.start))
    return out


@contextlib.contextmanager
def cloning(parent: Task, kid: ProcessImage | None):
    """While `kid` (None: a zombie) is cloned from `parent`: the parent's large
    private mappings that the kid will not keep are marked MADV_DONTFORK, so that
    the clone does not copy their page tables only for the kid to unmap them
    (30-50 ms per GiB of the parent, for each child that exec'd)."""
    if parent.vdso is None:  # not rebuilt: the seed's memory
        yield
        return
    kept = {v["start"] for v in kept_mappings(kid, parent.image)} if kid else set()
    skipped = [
        v for v in parent.image.vmas
        if v["kind"] in PRIVATE_KINDS and v["start"] not in kept
        and v["end"] - v["start"] >= DONTFORK_AT_LEAST
        and not any(f in v["vmflags"] for f in NOT_INHERITED)
    ]  # fmt: skip
    s = parent.session
    done = []
    try:
        for v in skipped:
            taskctl.madvise(s, v["start"], v["end"] - v["start"], MADV_DONTFORK)
            done.append(v)
        yield
    finally:
        for v in done:
            taskctl.madvise(s, v["start"], v["end"] - v["start"], MADV_DOFORK)
