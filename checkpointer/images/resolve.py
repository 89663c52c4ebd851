"""Where each page of an owner comes from at a dump, through its parent chain.

A restore writes every page the newest dump describes: its own data, zeros, or
whatever an ancestor held there. Resolving works on the pagemaps' runs only (no
page data is read), so a chain with a hole is refused before anything is built.
"""

from __future__ import annotations

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


def resolve(dump: Dump, owner: str) -> list[Piece]:
    """Every page `dump` holds for `owner`, in address order, with its source."""
    pm = dump.pagemap(owner)
    if pm is None:
        return []
    out: list[Piece] = []
    for lo, hi, where, off in pm.runs_in(0, 1 << 64):
        _add(out, dump, owner, pm, lo, hi, where, off)
    return out


def _add(
    out: list, dump: Dump, owner: str, pm: PageMap, lo: int, hi: int, where: int, off: int,
    seen: frozenset = frozenset(),
) -> None:  # fmt: skip
    if where == _HERE:
        out.append(Piece(lo, hi, pm, off))
    elif where == _ZERO:
        out.append(Piece(lo, hi, None, 0))
    elif where == _SAME:
        _from_same(out, dump, owner, pm.same_as, lo, hi, seen | {owner})
    else:
        _from_parent(out, dump, owner, lo, hi)


def _from_same(
    out: list, dump: Dump, owner: str, other: str, lo: int, hi: int, seen: frozenset
) -> None:
    """A same run: the pages `other` holds there in the same dump (a forked child's
    memory its parent still shared)."""
    where = os.path.join(dump.path, f"pagemap-{owner}")
    pm = dump.pagemap(other) if other not in seen else None
    cur = lo
    for a, b, w, off in pm.runs_in(lo, hi) if pm is not None else ():
        if a > cur:
            break
        _add(out, dump, other, pm, a, b, w, off, seen)
        cur = b
    if cur < hi:
        raise ImageError(
            f"{owner} pages {cur:#x}-{hi:#x} are flagged as the same as {other}'s, "
            + ("in a circle" if other in seen else "which does not hold them"),
            where,
        )


def _from_parent(out: list, dump: Dump, owner: str, lo: int, hi: int) -> None:
    where = os.path.join(dump.path, f"pagemap-{owner}")
    parent = dump.parent()
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
        _add(out, parent, owner, pm, a, b, w, off)
        cur = b
    if cur < hi:
        raise ImageError(
            f"{owner} pages {cur:#x}-{hi:#x} are flagged as in a parent, "
            "but no ancestor holds them",
            where,
        )
