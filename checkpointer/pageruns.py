"""Set operations on sorted, non-overlapping address ranges [start, end).

Trackers report which pages are present and which are dirty as lists of
ranges; the dumper needs their intersection and difference. Both inputs are
walked once, so the cost follows the number of ranges, not of pages.
"""

from __future__ import annotations

import bisect

Range = tuple[int, int]


def normalize(ranges: list[Range]) -> list[Range]:
    """Sort, drop empties, and merge touching or overlapping ranges."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    out: list[Range] = []
    append = out.append
    na, nb = len(a), len(b)
    if not na or not nb:
        return out
    i = j = 0
    a0, a1 = a[0]
    b0, b1 = b[0]
    while True:  # (plain comparisons: max/min calls cost a third of the time here)
        start = a0 if a0 > b0 else b0
        end = a1 if a1 < b1 else b1
        if start < end:
            append((start, end))
        if a1 < b1:
            i += 1
            if i == na:
                return out
            a0, a1 = a[i]
        else:
            j += 1
            if j == nb:
                return out
            b0, b1 = b[j]


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """The parts of `a` not covered by `b`."""
    out: list[Range] = []
    append = out.append
    nb = len(b)
    j = 0
    for start, end in a:
        while j < nb and b[j][1] <= start:
            j += 1
        if j == nb or b[j][0] >= end:  # untouched: the common case
            append((start, end))
            continue
        k = j
        while start < end:
            if k >= nb or b[k][0] >= end:
                append((start, end))
                break
            b0, b1 = b[k]
            if b0 > start:
                append((start, b0))
            if b1 > start:
                start = b1
            k += 1
    return out


def window(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    """The ranges that overlap [lo, hi), found by bisection (unclipped)."""
    first = bisect.bisect_right(ranges, lo, key=lambda r: r[1])
    last = bisect.bisect_left(ranges, hi, lo=first, key=lambda r: r[0])
    return ranges[first:last]


def within(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    """The parts of `ranges` inside [lo, hi): a window, cut at both ends (only its
    first and last range can stick out, so no walk of the rest)."""
    if hi <= lo:
        return []
    out = window(ranges, lo, hi)
    if out and out[0][0] < lo:
        out[0] = (lo, out[0][1])
    if out and out[-1][1] > hi:
        out[-1] = (out[-1][0], hi)
    return out


def clip(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    return intersect(ranges, [(lo, hi)])


def total(ranges: list[Range]) -> int:
    return sum(end - start for start, end in ranges)
