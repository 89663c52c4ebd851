"""Where each page of an owner comes from at a dump, through its parent chain.

A restore writes every page the newest dump describes: its own data, zeros, or
whatever an ancestor held there. Resolving works on the pagemaps' runs only (no
page data is read), so a chain with a hole is refused before anything is built.
"""

from __future__ import annotations

import bisect
import os
from typing import NamedTuple

from checkpointer.errors import ImageError
from checkpointer.images.reader import Dump, PageMap

_HERE, _PARENT, _ZERO, _SAME = 0, 1, 2, 3


class Piece(NamedTuple):
    """Pages [start, end) of one owner: from `source`'s page stream at `off`, or
    zeros when source is None."""

    start: int
    end: int
    source: PageMap | None
    off: int


# (a dump's real path, owner) -> what resolve() gave for it before, and its pieces'
# starts: a parent's pages looked up there, not through its chain again
# (Dump.open's `reuse`; see known()).
Known = dict[tuple[str, str], tuple[list[Piece], list[int]]]


def known(dump: Dump, resolved: dict[str, list[Piece]]) -> Known:
    """What resolve() gave for owners of `dump`, for resolving a later dump with."""
    return {(dump.real, o): (p, [x.start for x in p]) for o, p in resolved.items()}


def resolve(dump: Dump, owner: str, known: Known | None = None) -> list[Piece]:
    """Every page `dump` holds for `owner`, in address order, with its source."""
    pm = dump.pagemap(owner)
    if pm is None:
        return []
    out: list[Piece] = []
    for lo, hi, where, off in pm.runs_in(0, 1 << 64):
        _add(out, dump, owner, pm, lo, hi, where, off, known or {})
    return out


def _add(
    out: list, dump: Dump, owner: str, pm: PageMap, lo: int, hi: int, where: int, off: int,
    known: Known, seen: frozenset = frozenset(),
) -> None:  # fmt: skip
    if where == _HERE:
        out.append(Piece(lo, hi, pm, off))
    elif where == _ZERO:
        out.append(Piece(lo, hi, None, 0))
    elif where == _SAME:
        _from_same(out, dump, owner, pm.same_as, lo, hi, known, seen | {owner})
    else:
        _from_parent(out, dump, owner, lo, hi, known)


def _from_same(
    out: list, dump: Dump, owner: str, other: str, lo: int, hi: int, known: Known,
    seen: frozenset,
) -> None:  # fmt: skip
    """A same run: the pages `other` holds there in the same dump (a forked child's
    memory its parent still shared)."""
    where = os.path.join(dump.path, f"pagemap-{owner}")
    pm = dump.pagemap(other) if other not in seen else None
    cur = lo
    for a, b, w, off in pm.runs_in(lo, hi) if pm is not None else ():
        if a > cur:
            break
        _add(out, dump, other, pm, a, b, w, off, known, seen)
        cur = b
    if cur < hi:
        raise ImageError(
            f"{owner} pages {cur:#x}-{hi:#x} are flagged as the same as {other}'s, "
            + ("in a circle" if other in seen else "which does not hold them"),
            where,
        )


def _from_parent(out: list, dump: Dump, owner: str, lo: int, hi: int, known: Known) -> None:
    where = os.path.join(dump.path, f"pagemap-{owner}")
    parent = dump.parent()
    if parent is not None and (parent.real, owner) in known:
        _from_known(out, known[parent.real, owner], owner, lo, hi, where)
        return
    pm = parent.pagemap(owner) if parent is not None else None
    if pm is None:
        raise ImageError(
            f"{owner} pages {lo:#x}-{hi:#x} are flagged as in a parent, "
            + ("but the dump has no parent" if parent is None else "but no ancestor holds them"),
            where,
        )
    cur = lo
    for a, b, w, off in pm.runs_in(lo, hi):
        if a > cur:
            break
        _add(out, parent, owner, pm, a, b, w, off, known)
        cur = b
    if cur < hi:
        raise ImageError(
            f"{owner} pages {cur:#x}-{hi:#x} are flagged as in a parent, "
            "but no ancestor holds them",
            where,
        )


def _from_known(
    out: list, resolved: tuple[list[Piece], list[int]], owner: str, lo: int, hi: int, where: str
) -> None:
    """Pages [lo, hi) from a parent's resolved pieces (address order, contiguous where
    the parent holds pages)."""
    pieces, starts = resolved
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    cur = lo
    while cur < hi and i < len(pieces) and pieces[i].start <= cur:
        p = pieces[i]
        i += 1
        if p.end <= cur:
            continue
        end = min(hi, p.end)
        out.append(Piece(cur, end, p.source, p.off + cur - p.start if p.source else 0))
        cur = end
    if cur < hi:
        raise ImageError(
            f"{owner} pages {cur:#x}-{hi:#x} are flagged as in a parent, "
            "but no ancestor holds them",
            where,
        )
