"""MemReader: /proc/PID/mem reads into reused buffers, PROT_NONE, holes, exits."""

from __future__ import annotations

import errno
import struct

import pytest

from checkpointer.errors import TargetError
from checkpointer.kernel import proc
from checkpointer.kernel.memory import MemReader, MemWriter

P = 4096
M64 = (1 << 64) - 1


def fill(npages: int, seed: int) -> bytes:
    """Python copy of target.c's fill(): the expected contents of a region."""
    out = bytearray(npages * P)
    for pg0 in range(npages):
        pg = pg0 + seed
        off = pg0 * P
        kind = pg % 4
        if kind == 1:
            out[off : off + P] = b"checkpoint text " * (P // 16)
        elif kind == 2:
            out[off : off + P] = struct.pack(
                "<512Q", *(0x7F0000000000 + pg * P + i * 8 for i in range(P // 8))
            )
        elif kind == 3:
            x = (pg * 0x9E3779B97F4A7C15 + 1) & M64
            words = []
            for _ in range(P // 8):
                x ^= (x << 13) & M64
                x ^= x >> 7
                x ^= (x << 17) & M64
                words.append(x)
            out[off : off + P] = struct.pack("<512Q", *words)
    return bytes(out)


def test_reads_prot_none_region(spawn):
    t = spawn()
    start, size = t.regions["protnone"]
    assert next(m for m in proc.read_maps(t.pid) if m.start <= start < m.end).prot == "---p"
    with MemReader(t.pid) as mem:
        buf = bytearray(size)
        assert mem.read_into(start, memoryview(buf)) == size
        assert bytes(buf) == fill(size // P, 5)


def test_large_read_into_reused_buffer(spawn):
    t = spawn()
    start, size = t.regions["anon"]
    want = fill(16, 0)
    buf = bytearray(size)
    mv = memoryview(buf)
    with MemReader(t.pid) as mem:
        for _ in range(2):  # the same buffer, twice
            assert mem.read_into(start, mv) == size
            assert bytes(buf[: 16 * P]) == want
        # a sub-view: read 3 pages at an offset
        assert mem.read_into(start + 5 * P, mv[: 3 * P]) == 3 * P
        assert bytes(buf[: 3 * P]) == want[5 * P : 8 * P]
        assert mem.read(start + P, 16) == b"checkpoint text "


def test_short_read_at_hole_and_unmapped_address(spawn):
    t = spawn()
    maps = proc.read_maps(t.pid)
    # a VMA followed by a gap
    vma = next(a for a, b in zip(maps, maps[1:], strict=False) if a.end < b.start)
    with MemReader(t.pid) as mem:
        buf = bytearray(2 * P)
        n = mem.read_into(vma.end - P, buf)
        assert n == P
        with pytest.raises(OSError) as exc:
            mem.read_into(vma.end, buf)
        assert exc.value.errno == errno.EIO and f"{vma.end:#x}" in str(exc.value)


def test_exited_target(spawn):
    t = spawn()
    start, size = t.regions["anon"]
    mem = MemReader(t.pid)
    t.kill()
    try:
        assert mem.read_into(start, bytearray(P)) == 0  # mm gone: nothing to read
    finally:
        mem.close()
    with pytest.raises(TargetError, match="does not exist"):
        MemReader(t.pid)


def test_writer_is_safe_from_several_threads(spawn):
    """The restore's pool writes pages from two threads through one MemWriter: each
    write must land where it was aimed, with its own bytes. (Its iovecs were once
    shared by every call, and the syscall runs without the GIL: a write could take
    another thread's address and bytes, and its own were lost.)"""
    import threading

    t = spawn()
    start, size = t.regions["anon"]
    lost: list[str] = []

    def worker(k: int) -> None:
        addr = start + k * P
        with MemReader(t.pid) as reader:
            for i in range(3000):
                data = struct.pack("<QQ", k, i) * (P // 16)
                writer.write(addr, data)
                if reader.read(addr, P) != data:
                    lost.append(f"thread {k} write {i}")
                    return

    with MemWriter(t.pid) as writer:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not lost, lost
