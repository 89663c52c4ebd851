"""Copy planned page runs from /proc/PID/mem into an image's page writer.

A plan is a sorted list of Segments for one memory owner: ranges to copy
("data"), ranges the parent dump already holds ("parent"), and ranges whose page
frames a forked child still shares with its parent process ("same"). Data is read with
preadv into one reused buffer in large contiguous chunks and handed to the
writer, which compresses and streams it out; the dump is never held in memory.

With content comparison (the full tracker), every data chunk is first compared
page by page with what the parent chain holds at that address, and only pages
that differ are written.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from typing import NamedTuple

from checkpointer.errors import TargetError
from checkpointer.kernel.memory import MemReader

CHUNK = 8 << 20  # bytes read per preadv: large enough to amortize syscalls


class Segment(NamedTuple):
    start: int  # address (or offset into a shared object)
    end: int
    where: str  # "data", "parent", "zero" or "same" (as the parent process's pages)
    pid: int = 0  # process to read data from
    vaddr: int = 0  # its address of `start` (differs from start for shared objects)


@dataclass
class CopyTimes:
    memdump_us: int = 0  # reading the target's memory
    memwrite_us: int = 0  # handing pages to the writer (compression, I/O)


class PageCopier:
    def __init__(
        self, page_size: int, progress=None, partial_ok: bool = False, readers=None
    ) -> None:
        self.page_size = page_size
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self.progress = progress
        # Pre-dumps read a running target: a VMA unmapped since the scan reads
        # short. What was not read is simply not in this dump; anything mapped
        # there later is new memory and therefore dirty.
        self.partial_ok = partial_ok
        self.times = CopyTimes()
        # pid -> reader; `readers` replaces some (a copy-on-write snapshot's).
        self._readers: dict[int, MemReader] = dict(readers or {})
        # Touching data segments are read as one only straight from a frozen target:
        # a snapshot's reader holds some VMAs apart (read in the window) from the
        # rest (its child), and a running target's VMA may vanish under a read.
        self._coalesce = not readers and not partial_ok

    def copy(self, pages, plan: list[Segment], parent_reader=None) -> None:
        """Feed `plan` into `pages` (a PageWriter). parent_reader: for content
        comparison, a plan.ParentPages whose unchanged() pages are referenced
        rather than written; None copies every data segment."""
        parents: list[tuple[int, int]] = []  # recorded together: thousands per GiB
        for seg in _coalesced(plan) if self._coalesce else plan:
            if seg.where == "parent":
                parents.append((seg.start, seg.end))
                continue
            if parents:
                pages.add_parent_runs(parents)
                parents = []
            if seg.where == "zero":  # known to hold nothing (a hole of shared memory)
                pages.add_zero(seg.start, (seg.end - seg.start) // self.page_size)
                continue
            if seg.where == "same":  # the page frames of the parent process's
                pages.add_same(seg.start, (seg.end - seg.start) // self.page_size)
                continue
            if parent_reader is None and not self.partial_ok and hasattr(pages, "reserve"):
                # A complete read (a frozen tree, or a snapshot of it): straight
                # into the compression frames.
                self._copy_into_frames(pages, seg)
                continue
            for start in range(seg.start, seg.end, CHUNK):
                end = min(start + CHUNK, seg.end)
                try:
                    got = self._read(seg.pid, seg.vaddr + (start - seg.start), end - start)
                except TargetError:
                    if not self.partial_ok:
                        raise
                    got = 0  # exited since the scan; the dumper checks the root survived
                except OSError as err:
                    if not (self.partial_ok and err.errno == errno.EIO):
                        raise
                    got = 0  # unmapped since the scan (see partial_ok)
                if got < end - start and not self.partial_ok:
                    raise OSError(f"could not read memory of {seg.pid} at {start + got:#x}")
                got -= got % self.page_size
                if got:
                    self._write(pages, start, self.view[:got], parent_reader)
                if self.progress:
                    self.progress.advance((end - start) // self.page_size)
        if parents:
            pages.add_parent_runs(parents)

    def _copy_into_frames(self, pages, seg: Segment) -> None:
        """Read straight into the writer's compression frames: no copy in between."""
        start = seg.start
        while start < seg.end:
            space = pages.reserve(seg.end - start)
            if not len(space):
                # A frame with less than a page left: a 1-page read finishes it.
                space = self.view[: self.page_size]
                got = self._read(seg.pid, seg.vaddr + (start - seg.start), len(space), space)
                self._check_read(seg, start, start + len(space), got)
                if got:
                    self._write(pages, start, space[:got], None)
            else:
                size = len(space)
                got = self._read(seg.pid, seg.vaddr + (start - seg.start), size, space)
                space.release()
                self._check_read(seg, start, start + size, got)
                got -= got % self.page_size
                started = time.monotonic()
                pages.filled(start, got)
                self.times.memwrite_us += int((time.monotonic() - started) * 1e6)
            if self.progress:
                self.progress.advance(max(got, self.page_size) // self.page_size)
            if got < self.page_size:
                return
            start += got

    def _check_read(self, seg: Segment, start: int, end: int, got: int) -> None:
        if got < end - start and not self.partial_ok:
            raise OSError(f"could not read memory of {seg.pid} at {start + got:#x}")

    def _read(self, pid: int, addr: int, size: int, into=None) -> int:
        """Read size bytes at addr of pid into `into` (default: the copier's buffer)."""
        reader = self._readers.get(pid)
        if reader is None:
            reader = self._readers[pid] = MemReader(pid)
        started = time.monotonic()
        try:
            return reader.read_into(addr, self.view[:size] if into is None else into)
        finally:
            self.times.memdump_us += int((time.monotonic() - started) * 1e6)

    def _write(self, pages, start: int, data: memoryview, parent_reader) -> None:
        started = time.monotonic()
        try:
            if parent_reader is None:
                pages.add_data(start, data)
            else:
                self._write_changed(pages, start, data, parent_reader)
        finally:
            self.times.memwrite_us += int((time.monotonic() - started) * 1e6)

    def _write_changed(self, pages, start: int, data: memoryview, parent_reader) -> None:
        """Write the pages that differ from the parent chain; reference the rest."""
        pos = start
        end = start + len(data)
        for us, ue in parent_reader.unchanged(start, data):
            if us > pos:
                pages.add_data(pos, data[pos - start : us - start])
            pages.add_parent(us, (ue - us) // self.page_size)
            pos = ue
        if pos < end:
            pages.add_data(pos, data[pos - start :])

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _coalesced(plan: list[Segment]):
    """The plan with each stretch of touching data segments (of one process, at
    consecutive addresses) as one: neighbouring VMAs that differ only in their
    protection are one read, not one each (a process may have 30,000 of them)."""
    run: Segment | None = None
    for seg in plan:
        if (
            run is not None
            and seg.where == "data"
            and run.end == seg.start
            and run.pid == seg.pid
            and run.vaddr + (run.end - run.start) == seg.vaddr
        ):
            run = run._replace(end=seg.end)
            continue
        if run is not None:
            yield run
        run = seg if seg.where == "data" else None
        if run is None:
            yield seg
    if run is not None:
        yield run
