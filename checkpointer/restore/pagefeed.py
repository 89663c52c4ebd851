"""Write page data from the images into a process (or a shared object) fast.

Each frame is decompressed and its pages written by one worker of a small
thread pool, a few frames in flight at once (zstd and the writes both release
the GIL), so on two cores both decompress and fault pages into the target.
Each frame is decompressed once, and its pages are written straight from it,
without another copy.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from checkpointer.images import format as fmt
from checkpointer.images.resolve import Piece
from checkpointer.kernel.syscalls import libc

AHEAD = 8  # frames decompressed ahead of the writes (bounded memory: ~8 MiB)
_tls = threading.local()


def _decompress(pm, index: int) -> bytes:
    dctx = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = _tls.dctx = fmt.decompressor()
    return pm.frame_uncached(index, dctx)


def _frame_jobs(pieces: Iterable[Piece], delta: int):
    """(pm, frame index, [(address, offset in frame, length)]) in piece order."""
    job = None
    for piece in pieces:
        pm = piece.source
        fs = pm.frame_size
        off, addr, left = piece.off, piece.start - delta, piece.end - piece.start
        while left:
            index, inner = divmod(off, fs)
            n = min(left, fs - inner)
            if job is not None and job[0] is pm and job[1] == index:
                job[2].append((addr, inner, n))
            else:
                if job is not None:
                    yield job
                job = (pm, index, [(addr, inner, n)])
            off, addr, left = off + n, addr + n, left - n
    if job is not None:
        yield job


def write_pieces(sink, pieces: list[Piece], delta: int = 0, workers: int = 2) -> int:
    """Write every data piece at (piece address - delta) with sink(addr, frame,
    offset in frame, size); the bytes written."""
    data_pieces = [p for p in pieces if p.source is not None]
    sources = {id(p.source): p.source for p in data_pieces}
    for pm in sources.values():
        pm.open_pages()
    # In source order, not address order: the pieces of a chain interleave (the
    # pages a later dump rewrote sit between its parent's), and each switch of
    # source would decompress a frame again. No two pieces overlap, so the order
    # of the writes does not matter.
    rank = {key: n for n, key in enumerate(sources)}
    data_pieces.sort(key=lambda p: (rank[id(p.source)], p.off))
    written = 0
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="pagefeed") as pool:
            pending: collections.deque = collections.deque()
            for job in _frame_jobs(data_pieces, delta):
                pending.append(pool.submit(_decompress_and_write, sink, *job))
                if len(pending) >= AHEAD:
                    written += pending.popleft().result()
            while pending:
                written += pending.popleft().result()
    finally:
        # Each pages file serves one owner, written once: a tree with tens of
        # thousands of shared objects would otherwise hold as many files open.
        for pm in sources.values():
            pm.close()
    return written


def _decompress_and_write(sink, pm, index: int, parts: list) -> int:
    """One frame, start to end, on a worker: with the writes on the workers too,
    both cores decompress and fault pages in (a writer thread of its own was the
    bottleneck: 0.42 s of its 0.53 s restore of 1 GiB went to the writes)."""
    frame = _decompress(pm, index)
    total = 0
    for addr, inner, n in parts:
        sink(addr, frame, inner, n)
        total += n
    return total


def file_sink(fd: int):
    """A sink that pwrites into a file (a shared memory object's fd)."""

    def write(addr: int, frame: bytes, inner: int, n: int) -> None:
        if os.pwrite(fd, memoryview(frame)[inner : inner + n], addr) != n:
            raise OSError(f"short write at {addr:#x}")

    return write


_memcmp = libc.memcmp  # through ctypes: without the GIL, so both workers compare
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def changed_pages_sink(reader, write, page: int = os.sysconf("SC_PAGE_SIZE")):
    """A sink that writes only the pages that differ from what the process holds
    already (read with reader.read_into(addr, view)): for memory it shares
    copy-on-write with another process, where writing an equal page would only
    make a private copy. Each worker reads into a buffer of its own."""

    def sink(addr: int, frame: bytes, inner: int, n: int) -> None:
        buf, here = _read_buffer(n)
        got = reader.read_into(addr, memoryview(buf)[:n])
        there = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value + inner
        if got == n and _memcmp(here, there, n) == 0:
            return
        run = None  # offset where the current run of changed pages began
        for off in range(0, n, page):
            size = min(page, n - off)
            if off + size > got or _memcmp(here + off, there + off, size):
                if run is None:
                    run = off
            elif run is not None:
                write(addr + run, frame, inner + run, off - run)
                run = None
        if run is not None:
            write(addr + run, frame, inner + run, n - run)

    return sink


def _read_buffer(n: int) -> tuple[bytearray, int]:
    """This thread's buffer of at least n bytes, and its address."""
    held = getattr(_tls, "read_buffer", None)
    if held is None or len(held[0]) < n:
        buf = bytearray(n)
        held = _tls.read_buffer = (buf, ctypes.addressof((ctypes.c_char * n).from_buffer(buf)))
    return held
