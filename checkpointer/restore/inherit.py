"""What a process keeps of the memory it was cloned with (part of step 3).

Each process is cloned from its parent once the parent's memory is rebuilt, so
it starts with a copy-on-write image of it, as it did when it was forked. Every
process is dumped whole, so rebuilding a child from its own pages alone would
give it a private copy of each page it shared with its parent: a server with
four workers sharing 100 MB would need 400 MB after restore. Instead, as CRIU
does, a child keeps its parent's private memory wherever both images map the
same kind of memory (anonymous memory, or the same file at the same offsets)
with the flags restore cannot clear, even where the mapping grew, shrank or was
split since the fork (its protection is set again); then only the pages that
differ from its parent's are written, and those its parent holds and it does not
are dropped (MADV_DONTNEED: zeros again for anonymous memory, the file's bytes
for a private file mapping). The root of a migration keeps a template's memory
the same way (template.py).

Both processes' memory equals their images, so comparing images is enough:
a page neither image holds is zeros, or the file, in both. A child that keeps
little (one that ran another program) is cloned with its parent's other large
mappings marked MADV_DONTFORK meanwhile (cloning()).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from typing import NamedTuple

from checkpointer.images.resolve import Piece
from checkpointer.kernel import taskctl
from checkpointer.pageruns import Range, intersect, normalize, subtract, window
from checkpointer.restore.images import ProcessImage
from checkpointer.restore.task import Task

PRIVATE_KINDS = ("anon", "heap", "stack", "file-private")
ANON_KINDS = ("anon", "heap", "stack")  # the same memory to the kernel ([heap] is brk's)
# A fork does not copy a MADV_DONTFORK mapping ("dc"), and gives a
# MADV_WIPEONFORK one ("wf") fresh zeros: nothing of either is shared.
NOT_INHERITED = ("dc", "wf")
# VmFlags a kept range must have alike in both: mmap's (growing down, not
# accounted) and those madvise or mlock set, which restore sets but never clears.
ALIKE_FLAGS = ("gd", "nr", "rr", "sr", "mg", "hg", "nh", "dd", "lo")
MADV_DONTFORK, MADV_DOFORK = 10, 11
# Smaller mappings cost less to copy at a clone than two injected madvise calls.
DONTFORK_AT_LEAST = 1 << 20


class KeptRange(NamedTuple):
    """Addresses [start, end) a process keeps from the one it was cloned from,
    inside one mapping of each; `prot` is the source's there (mprotect fixes it)."""

    start: int
    end: int
    prot: str


def _alike(mine: dict, theirs: dict) -> bool:
    """Whether the two mappings' common addresses hold the same kind of memory:
    private anonymous memory in both, or the same file at the same offsets."""
    for v in (mine, theirs):
        if v["kind"] not in PRIVATE_KINDS or v["shmem"]:
            return False
        if any(f in v["vmflags"] for f in NOT_INHERITED):
            return False
    if (mine["kind"] in ANON_KINDS) != (theirs["kind"] in ANON_KINDS):
        return False
    if mine["kind"] == "file-private" and (
        any(mine.get(k) != theirs.get(k) for k in ("path", "ghost", "stat", "dev", "inode"))
        or mine["offset"] - mine["start"] != theirs["offset"] - theirs["start"]
    ):
        return False
    return all((f in mine["vmflags"]) == (f in theirs["vmflags"]) for f in ALIKE_FLAGS)


def kept_ranges(image: ProcessImage, source: ProcessImage | None) -> list[KeptRange]:
    """The addresses of `image`'s private mappings it keeps from the process it was
    cloned from (whose image is `source`; None: the seed, whose memory is nobody's):
    wherever a mapping of each holds the same kind of memory. A mapping the program
    grew, shrank, split (mprotect) or partly unmapped since keeps what is common
    (a glibc arena grows by mprotect; a template is a pre-dump's layout)."""
    if source is None:
        return []
    theirs = source.vmas
    kept: list[KeptRange] = []
    i = 0
    for vma in image.vmas:  # both in address order, none overlapping
        while i < len(theirs) and theirs[i]["end"] <= vma["start"]:
            i += 1
        j = i
        while j < len(theirs) and theirs[j]["start"] < vma["end"]:
            other = theirs[j]
            if _alike(vma, other):
                lo, hi = max(vma["start"], other["start"]), min(vma["end"], other["end"])
                kept.append(KeptRange(lo, hi, other["prot"]))
            j += 1
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
    file, same offset: a child's pages dumped as its parent's, or a page a
    template holds from a pre-dump that the final dump did not write again).
    Those are in the process already; only the rest needs comparing."""
    starts = [p.start for p in source]
    files: dict[int, str] = {}

    def same_file(a, b) -> bool:  # a template's pieces come from another load of the chain
        if a is b:
            return True
        for pm in (a, b):
            if id(pm) not in files:
                path = getattr(pm, "pages_path", None)
                files[id(pm)] = os.path.realpath(path) if path else f"{id(pm)}"
        return files[id(a)] == files[id(b)]

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
            if same_bytes and theirs.source is not None and same_file(theirs.source, piece.source):
                if lo > pos:
                    out.append(Piece(pos, lo, piece.source, piece.off + pos - piece.start))
                pos = hi
        if pos < piece.end:
            out.append(Piece(pos, piece.end, piece.source, piece.off + pos - piece.start))
    return out


@contextlib.contextmanager
def cloning(parent: Task | None, kid: ProcessImage | None):
    """While `kid` (None: a zombie) is cloned from `parent`: the parent's large
    private mappings that the kid will not keep are marked MADV_DONTFORK, so that
    the clone does not copy their page tables only for the kid to unmap them
    (30-50 ms per GiB of the parent, for each child that exec'd)."""
    if parent is None or parent.vdso is None:  # not rebuilt: the seed's memory
        yield
        return
    kept = [(r.start, r.end) for r in kept_ranges(kid, parent.image)] if kid else []
    skipped = [
        v for v in parent.image.vmas
        if v["kind"] in PRIVATE_KINDS and not window(kept, v["start"], v["end"])
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
