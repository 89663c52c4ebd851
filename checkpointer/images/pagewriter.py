"""PageWriter: page runs of one owner -> pages-OWNER (parallel zstd frames) + pagemap-OWNER."""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import threading
from concurrent import futures
from typing import NamedTuple

import msgpack
import zstandard as zstd

from checkpointer.images import format as fmt

# zstd level for page frames. Measured on mixed memory (scripts/bench-images, one
# core, non-zero pages): level 1 0.48 GB/cpu-s ratio 2.23; -1 0.57 GB/cpu-s ratio
# 1.97; -3 0.70 ratio 1.80. -1 is the best ratio that leaves room for 1 GB/s of input
# on 2 cores next to the page copier; the caller can pass another level.
PAGE_LEVEL = -1
# A frozen dump's downtime is the copy: there zstd's fast end pays. Level -50 still
# halves text and pointer pages (ratio 1.6 on the same mix) at about 5 GB/s on 2
# threads, against 1.8 GB/s for -1 (measured 2026-11-26 on this 2-core machine).
FROZEN_LEVEL = -50
# The final dump of a chain copies only what was written since the last pass, a few
# MB: its window is the copy, and the size hardly counts. Level -500 compresses
# 10 MB of hot pages about 3 ms sooner (a converge's kill-mode window: 26 -> 23 ms);
# measured on the bench target's mix, 6.5 GB/s ratio 1.83 against 1.3 GB/s 2.08,
# on a Python heap 5.7 GB/s 1.12 against 3.1 GB/s 1.63 (one thread, 2026-11-27).
FROZEN_INCREMENTAL_LEVEL = -500
RECORD_LEVEL = 3
ZERO_BLOCK_PAGES = 8


class PageStats(NamedTuple):
    written: int
    zero: int
    parent: int
    bytes_raw: int
    bytes_compressed: int
    same: int = 0  # pages recorded as the same as `same_as`'s


def write_file(path: str, data: bytes) -> None:
    """Create a 0600 file holding data. Not fsynced here: DumpWriter.commit syncs
    every file at once, after a frozen dump has let its target go."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, data)
    finally:
        os.close(fd)


# Over this many files, one syncfs() of the file system beats an fsync() each (a
# tree with 20,000 shared objects writes 40,000 files: 5.2 s of fsyncs here).
SYNCFS_OVER = 256


def fsync_files(dirpath: str) -> None:
    """fsync every regular file in dirpath (or, for many, the file system)."""
    names = os.listdir(dirpath)
    if len(names) > SYNCFS_OVER and _syncfs(dirpath):
        return
    for name in names:
        fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _syncfs(path: str) -> bool:
    """syncfs() the file system holding path; False if it failed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_tls = threading.local()
_zero_blocks: dict[int, bytes] = {}


def _zero_block(page_size: int) -> bytes:
    """ZERO_BLOCK_PAGES zero pages, one object shared by every writer."""
    block = _zero_blocks.get(page_size)
    if block is None:
        block = _zero_blocks[page_size] = bytes(page_size * ZERO_BLOCK_PAGES)
    return block


def _record_compressor() -> zstd.ZstdCompressor:
    """This thread's compressor for pagemap records (a context costs more to make
    than a small pagemap does to compress)."""
    cctx = getattr(_tls, "record_cctx", None)
    if cctx is None:
        cctx = zstd.ZstdCompressor(level=RECORD_LEVEL, write_checksum=True, write_content_size=True)
        _tls.record_cctx = cctx
    return cctx


def _compress(level: int, buf: bytearray, n: int) -> bytes:
    cctx = getattr(_tls, "cctx", None)
    if cctx is None or _tls.level != level:
        cctx = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        _tls.cctx, _tls.level = cctx, level
    return cctx.compress(memoryview(buf)[:n])


def _write_when_compressed(fd: int, compressed) -> int:
    """Writer-thread job: write one frame once compressed; frames are written in
    submission order because the writer is a single thread."""
    data = compressed.result()
    write_all(fd, data)
    return len(data)


class FramePool:
    """Frame buffers for a dump's page writers, which write one owner after another.
    They are faulted in when the pool is made (a dump makes it before any freeze):
    a fresh buffer costs a page fault per page at its first fill, and each owner's
    writer used to fill fresh ones, inside a frozen window."""

    def __init__(self, frame_size: int, count: int) -> None:
        self.frame_size = frame_size
        self._free = [self._touched() for _ in range(count)]

    def _touched(self) -> bytearray:
        buf = bytearray(self.frame_size)
        buf[:: mmap.PAGESIZE] = bytes(len(range(0, self.frame_size, mmap.PAGESIZE)))
        return buf

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.frame_size)

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)


class PageWriter:
    """Page runs of one owner: pages-OWNER (zstd frames) + pagemap-OWNER (index, runs).

    Frames are compressed on the shared pool and written by the dump's writer
    thread (`writer`, one thread shared by the owners, which are written one after
    another: a thread each cost a start per object), so the caller's thread only
    copies pages in; at most `max_in_flight` frames are pending, so memory stays
    bounded (~ (max_in_flight + 2) * frame_size).
    """

    def __init__(
        self, dirpath, owner, page_size, frame_size, pool, writer, level, max_in_flight,
        same_as=None, frames: FramePool | None = None,
    ):  # fmt: skip
        self.owner = owner
        self.same_as = same_as  # the owner whose pages "same" runs are
        self.page_size = page_size
        self.frame_size = frame_size
        self._dir = dirpath
        self._pool = pool
        self._level = level
        self._max_in_flight = max_in_flight
        self._zero_block = _zero_block(page_size)
        self._buffers = frames or FramePool(frame_size, 0)
        self._frame = self._buffers.take()
        self._writer = writer
        self._fill = 0
        self._inflight: collections.deque = collections.deque()
        self._frames: list[list[int]] = []  # [off, clen, rlen]
        # runs are kept packed (~35 bytes each); only the last one is still growing
        self._packer = msgpack.Packer(use_bin_type=True)
        self._packed_runs = bytearray()
        self._nr_runs = 0
        self._last: list | None = None  # [addr, nr, where, off]
        self._pos = 0  # uncompressed stream position
        self._file_off = fmt.HEADER_SIZE
        self._next_addr = 0
        self._counts = {"here": 0, "parent": 0, "zero": 0, "same": 0}
        # Ranges recorded as the parent's, for the dumper's check before commit.
        self.parent_ranges: list[tuple[int, int]] = []
        self.closed = False
        self.stats: PageStats | None = None
        self._fd = os.open(
            os.path.join(dirpath, f"pages-{owner}"),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o600,
        )
        os.fchmod(self._fd, 0o600)
        write_all(self._fd, fmt.pack_header("pages"))

    # ---- runs ----

    def _check(self, addr: int, nbytes: int) -> None:
        if self.closed:
            raise ValueError(f"pages-{self.owner} is closed")
        ps = self.page_size
        if addr < 0 or addr % ps or nbytes % ps:
            raise ValueError(f"page run {addr:#x}+{nbytes:#x} is not page aligned")
        if addr < self._next_addr:
            raise ValueError(
                f"page run at {addr:#x} overlaps or precedes {self._next_addr:#x} "
                f"(runs must be added in increasing address order)"
            )
        if addr + nbytes > 1 << 64:
            raise ValueError(f"page run {addr:#x}+{nbytes:#x} beyond 64-bit addresses")

    def _add_run(self, addr: int, nr: int, where: str, off: int | None) -> None:
        if nr == 0:
            return
        self._counts[where] += nr
        ps = self.page_size
        last = self._last
        if last is not None:
            if (
                last[2] == where
                and last[0] + last[1] * ps == addr
                and (where != "here" or last[3] + last[1] * ps == off)
            ):
                last[1] += nr
                self._next_addr = addr + nr * ps
                return
            self._flush_run()
        self._last = [addr, nr, where, off]
        self._next_addr = addr + nr * ps

    def _flush_run(self) -> None:
        a, nr, w, off = self._last
        self._packed_runs += self._packer.pack({"addr": a, "nr": nr, "where": w, "off": off})
        self._nr_runs += 1
        self._last = None

    def add_parent(self, addr: int, nr_pages: int) -> None:
        self.add_parent_runs([(addr, addr + nr_pages * self.page_size)])

    def add_parent_runs(self, runs: list[tuple[int, int]]) -> None:
        """add_parent() for each [start, end) of `runs` (in address order) in one
        call: a final dump records thousands, one per run of present pages that its
        parent holds, while its tree is frozen."""
        if self.closed:
            raise ValueError(f"pages-{self.owner} is closed")
        ps = self.page_size
        held = self.parent_ranges
        # _add_run's work, inline: a call or two less per run, thousands of times.
        pack, packed = self._packer.pack, self._packed_runs
        last, flushed, pages = self._last, 0, 0
        try:
            for start, end in runs:
                if start < self._next_addr or start % ps or end % ps or end <= start:
                    self._check(start, end - start)  # raises, saying why
                    if end <= start:
                        continue  # an empty run: nothing to record
                if end > 1 << 64:
                    raise ValueError(f"page run {start:#x}-{end:#x} beyond 64-bit addresses")
                if held and held[-1][1] == start:
                    held[-1] = (held[-1][0], end)
                else:
                    held.append((start, end))
                nr = (end - start) // ps
                pages += nr
                if last is not None and last[2] == "parent" and last[0] + last[1] * ps == start:
                    last[1] += nr
                else:
                    if last is not None:
                        a, n, w, off = last
                        packed += pack({"addr": a, "nr": n, "where": w, "off": off})
                        flushed += 1
                    last = [start, nr, "parent", None]
                self._next_addr = end
        finally:
            self._last = last
            self._nr_runs += flushed
            self._counts["parent"] += pages

    def add_same(self, addr: int, nr_pages: int) -> None:
        """Pages that hold what `same_as`'s pages at the same addresses hold in this
        dump (memory a forked child still shares with its parent)."""
        if self.same_as is None:
            raise ValueError(f"pages-{self.owner} has no owner to be the same as")
        self._check(addr, nr_pages * self.page_size)
        self._add_run(addr, nr_pages, "same", None)

    def add_zero(self, addr: int, nr_pages: int) -> None:
        self._check(addr, nr_pages * self.page_size)
        self._add_run(addr, nr_pages, "zero", None)

    def add_data(self, addr: int, buf) -> None:
        """Page data from addr; zero stretches become zero runs, the rest is queued
        for compression."""
        mv = memoryview(buf).cast("B")
        self._check(addr, len(mv))
        for lo, hi, is_zero in self._stretches(mv):
            self._emit(addr, mv, lo, hi, is_zero)

    def _stretches(self, mv: memoryview):
        """(lo, hi, is_zero) stretches of mv. Zeros are found per block of
        ZERO_BLOCK_PAGES pages: an isolated zero page costs zstd next to nothing,
        while a run record per page costs Python time on the dump's critical path."""
        n = len(mv)
        block = self.page_size * ZERO_BLOCK_PAGES
        zero = self._zero_block
        run_start, run_zero = 0, None
        for j in range(0, n, block):
            end = min(j + block, n)
            # Sampled bytes reject almost every data block before the full compare.
            z = (
                not (mv[j] or mv[end - 1] or mv[(j + end) // 2])
                and mv[j:end].tobytes() == zero[: end - j]
            )
            if z != run_zero:
                if run_zero is not None:
                    yield run_start, j, run_zero
                run_start, run_zero = j, z
        if n:
            yield run_start, n, run_zero

    def reserve(self, max_bytes: int) -> memoryview:
        """Free space at the end of the current frame (at most max_bytes, whole
        pages) for the caller to read page data into directly, sparing a copy;
        `filled` then says how much it holds."""
        take = min(self.frame_size - self._fill, max_bytes)
        take -= take % self.page_size
        return memoryview(self._frame)[self._fill : self._fill + take]

    def filled(self, addr: int, nbytes: int) -> None:
        """nbytes of page data from addr were read into the space `reserve` gave:
        the same as add_data, without the copy (zero stretches are squeezed out)."""
        self._check(addr, nbytes)
        base = self._fill
        mv = memoryview(self._frame)[base : base + nbytes]
        for lo, hi, is_zero in self._stretches(mv):
            nr = (hi - lo) // self.page_size
            if is_zero:
                self._add_run(addr + lo, nr, "zero", None)
                continue
            if self._fill != base + lo:  # a zero stretch went before: move down
                self._frame[self._fill : self._fill + hi - lo] = mv[lo:hi].tobytes()
            self._add_run(addr + lo, nr, "here", self._pos)
            self._fill += hi - lo
            self._pos += hi - lo
        mv.release()
        if self._fill == self.frame_size:
            self._submit()

    def _emit(self, a0, mv, lo, hi, is_zero):
        nr = (hi - lo) // self.page_size
        if is_zero:
            self._add_run(a0 + lo, nr, "zero", None)
            return
        self._add_run(a0 + lo, nr, "here", self._pos)
        self._append(mv[lo:hi])

    # ---- frames ----

    def _append(self, data: memoryview) -> None:
        fs = self.frame_size
        while data:
            take = min(fs - self._fill, len(data))
            self._frame[self._fill : self._fill + take] = data[:take]
            self._fill += take
            self._pos += take
            data = data[take:]
            if self._fill == fs:
                self._submit()

    def _submit(self) -> None:
        if not self._fill:
            return
        buf, n = self._frame, self._fill
        compressed = self._pool.submit(_compress, self._level, buf, n)
        written = self._writer.submit(_write_when_compressed, self._fd, compressed)
        self._inflight.append((written, compressed, buf, n))
        self._frame = self._buffers.take()
        self._fill = 0
        while len(self._inflight) >= self._max_in_flight:
            self._drain_one()

    def _drain_one(self) -> None:
        written, _, buf, n = self._inflight.popleft()
        clen = written.result()  # an OSError of the writer thread (ENOSPC) lands here
        self._frames.append([self._file_off, clen, n])
        self._file_off += clen
        self._buffers.give(buf)

    def close(self) -> PageStats:
        if self.closed:
            return self.stats
        self._submit()
        while self._inflight:
            self._drain_one()
        os.close(self._fd)
        self._fd = -1
        self.closed = True
        ps = self.page_size
        if self._last is not None:
            self._flush_run()
        compressed = self._file_off - fmt.HEADER_SIZE
        head = {
            "owner": self.owner,
            "page_size": ps,
            "frame_size": self.frame_size,
            "nr_frames": len(self._frames),
            "nr_runs": self._nr_runs,
            "pages_here": self._counts["here"],
            "pages_parent": self._counts["parent"],
            "pages_zero": self._counts["zero"],
            "bytes_raw": self._counts["here"] * ps,
            "bytes_compressed": compressed,
        }
        if self._counts["same"]:
            head.update(same_as=self.same_as, pages_same=self._counts["same"])
        packer = self._packer
        parts = [packer.pack(head)]
        parts += [packer.pack({"off": o, "clen": c, "rlen": r}) for o, c, r in self._frames]
        parts.append(self._packed_runs)
        body = b"".join(parts)
        fmt.check_writable("pagemap", len(parts) - 1 + self._nr_runs, len(body))
        data = fmt.pack_header("pagemap") + _record_compressor().compress(body)
        write_file(os.path.join(self._dir, f"pagemap-{self.owner}"), data)
        self.stats = PageStats(
            self._counts["here"], self._counts["zero"], self._counts["parent"],
            self._counts["here"] * ps, compressed, self._counts["same"],
        )  # fmt: skip
        # A closed writer stays in its DumpWriter until the commit: keep nothing big
        # (a tree may hold tens of thousands of shared objects, one writer each).
        self._buffers.give(self._frame)
        self._frame = bytearray()
        self._packed_runs = bytearray()
        self._packer = None
        return self.stats

    def _abort(self) -> None:
        for _, compressed, _, _ in self._inflight:
            compressed.cancel()
        # The writer thread must be done with the fd before it is closed (and its
        # number reused).
        for written, _, _, _ in self._inflight:
            if not written.cancel():
                futures.wait([written])
        self._inflight.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.closed = True
