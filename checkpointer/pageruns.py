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
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """The parts of `a` not covered by `b`."""
    out: list[Range] = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while start < end:
            if k >= len(b) or b[k][0] >= end:
                out.append((start, end))
                break
            if b[k][0] > start:
                out.append((start, b[k][0]))
            start = max(start, b[k][1])
            k += 1
    return out


def window(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    """The ranges that overlap [lo, hi), found by bisection (unclipped)."""
    first = bisect.bisect_right(ranges, lo, key=lambda r: r[1])
    last = bisect.bisect_left(ranges, hi, lo=first, key=lambda r: r[0])
    return ranges[first:last]


def clip(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    return intersect(ranges, [(lo, hi)])


def total(ranges: list[Range]) -> int:
    return sum(end - start for start, end in ranges)
