"""Round trips through DumpWriter / Dump: records, page runs, chains, shm owners."""

import os

import pytest

from checkpointer.errors import ImageError
from checkpointer.images import Dump, DumpWriter, PageRun
from checkpointer.images import samples as s

PS = 4096


def pg(tag: int, n: int = 1) -> bytes:
    return b"".join(bytes([tag + i & 0xFF or 1]) * PS for i in range(n))


def test_every_record_kind_round_trips(tmp_path):
    path = str(tmp_path / "d")
    proc = s.process_rec(10, "prog")
    proc["creds"]["cap_bnd"] = (1 << 64) - 1
    proc["rlimits"]["stack"] = [8 << 20, -1]
    threads = [s.thread_rec(10), s.thread_rec(11)]
    threads[1]["regs"]["rip"] = (1 << 64) - 16
    threads[1]["xstate"] = bytes(range(256)) * 4
    mm = s.mm_rec()
    mm["auxv"] = b"\x06\0\0\0\0\0\0\0\0\x10\0\0\0\0\0\0"
    mm["exe"] = None
    vmas = [s.vma_rec(0x1000, 0x3000), s.vma_rec(0x10000, 0x20000, "shm", "shm-00:05-9", 0x2000)]
    fds = [s.fd_rec(0), s.fd_rec(7, "socket:[1234]") | {"type": "socket"}]
    stats = s.stats_rec(1, 2, 3, 4, 5, iteration=7)
    tree = [s.pstree_rec(10, 1, [10, 11])]
    with DumpWriter(path, "pre-dump") as w:
        w.write_pstree(tree)
        w.write_core(10, proc, threads)
        w.write_mm(10, mm, vmas)
        w.write_fds(10, fds)
        w.write_stats(stats)
        w.commit({"tracker": "uffd-wp", "tracking": {"uffd": {"10": 5}}, "start_times": {"10": 9}})
    d = Dump.open(path)
    assert d.pstree == tree
    assert d.core(10) == (proc, threads)
    assert d.mm(10) == (mm, vmas)
    assert d.fds(10) == fds
    assert d.stats == stats
    inv = d.inventory
    assert inv["kind"] == "pre-dump" and inv["complete"] and inv["parent"] is None
    assert inv["format_version"] == 2 and inv["pids"] == [10] and inv["root_pid"] == 10
    assert inv["tracking"] == {"uffd": {"10": 5}} and inv["tracker"] == "uffd-wp"
    assert d.parent() is None
    with pytest.raises(ImageError, match="pid 99 is not in this dump"):
        d.core(99)


def test_writer_rejects_bad_records(tmp_path):
    with DumpWriter(str(tmp_path / "d")) as w:
        bad = s.process_rec(1)
        del bad["comm"]
        with pytest.raises(ImageError, match="missing field 'comm'"):
            w.write_core(1, bad, [])
        with pytest.raises(ImageError, match=r"vma\[0\]\.kind: unexpected value"):
            w.write_mm(1, s.mm_rec(), [s.vma_rec(0, 4096, kind="weird")])
        w.write_pstree([s.pstree_rec(1)])
        with pytest.raises(ImageError, match=r"tracking\['per_pid'\]: map key 12 is not a string"):
            w.commit({"tracking": {"per_pid": {12: {"fd": 3}}}})
        with pytest.raises(ImageError, match="unsupported value type set"):
            w.commit({"tracking": {"x": {1, 2}}})
        w.abort()
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.damages_images
def test_page_runs_zero_detection_merge_and_frames(tmp_path):
    """Zero stretches are found per block of ZERO_BLOCK_PAGES (8) pages."""
    path = str(tmp_path / "d")
    data = bytearray(pg(1, 8) + bytes(8 * PS) + pg(9, 1))
    vmas = [s.vma_rec(0x100000, 0x200000)]
    with DumpWriter(path, frame_size=2 * PS) as w:
        w.write_pstree([s.pstree_rec(5)])
        w.write_core(5, s.process_rec(5), [s.thread_rec(5)])
        w.write_mm(5, s.mm_rec(), vmas)
        pw = w.open_pages("pid-5")
        pw.add_data(0x100000, data)
        data[:] = b"\xee" * len(data)  # caller reuses its buffer
        pw.add_data(0x111000, memoryview(pg(20, 2)))  # contiguous with the previous "here"
        pw.add_zero(0x113000, 2)
        pw.add_zero(0x115000, 1)  # merges
        pw.add_parent(0x118000, 4)
        with pytest.raises(ValueError, match="increasing address order"):
            pw.add_data(0x100000, pg(1))
        with pytest.raises(ValueError, match="page aligned"):
            pw.add_zero(0x120001, 1)
        st = pw.close()
        assert st == (11, 11, 4, 11 * PS, st.bytes_compressed, 0)
        w.commit()
    d = Dump.open(path)
    assert list(d.page_runs("pid-5")) == [
        PageRun(0x100000, 8, "here", 0),
        PageRun(0x108000, 8, "zero", None),
        PageRun(0x110000, 3, "here", 8 * PS),
        PageRun(0x113000, 3, "zero", None),
        PageRun(0x118000, 4, "parent", None),
    ]
    pm = d.pagemap("pid-5")
    assert len(pm.f_off) == 6 and list(pm.f_rlen) == [2 * PS] * 5 + [PS]
    got = d.read_memory(5, 0x100000, 22 * PS)
    assert got == pg(1, 8) + bytes(8 * PS) + pg(9, 1) + pg(20, 2) + bytes(3 * PS)
    # unaligned read across a frame boundary
    assert d.read_memory(5, 0x101800, 0x1000) == pg(2)[:0x800] + pg(3)[:0x800]
    # never populated anon page inside the VMA reads as zeros
    assert d.read_memory(5, 0x150000, 16) == bytes(16)
    # flagged parent but no parent
    with pytest.raises(ImageError, match="flagged as in a parent, but the dump has no parent"):
        d.read_memory(5, 0x118000, 1)
    with pytest.raises(ImageError, match="0x200000-0x200010 is not mapped in pid 5"):
        d.read_memory(5, 0x1FFFF0, 0x20)


def _chain(tmp_path):
    """3-level chain; pid-7 private memory plus one shm object mapped at an offset."""
    top = tmp_path / "imgs"
    top.mkdir()
    shm = "shm-00:01-77"
    vmas = [
        s.vma_rec(0x10000, 0x18000),
        s.vma_rec(0x400000, 0x402000, "file-private", path="/bin/x"),
        s.vma_rec(0x7000000, 0x7002000, "shm", shm, offset=2 * PS, path="/dev/shm/x"),
    ]
    p1 = s.write_simple(
        str(top / "1"), 7, vmas, {
            "pid-7": [("add_data", 0x10000, pg(10, 4)), ("add_zero", 0x14000, 2)],
            shm: [("add_data", 0, pg(50, 4))],
        }, kind="pre-dump",
    )  # fmt: skip
    p2 = s.write_simple(
        str(top / "2"), 7, vmas, {
            "pid-7": [("add_parent", 0x10000, 1), ("add_data", 0x11000, pg(20)),
                      ("add_parent", 0x12000, 4)],
            shm: [("add_parent", 0, 3), ("add_data", 3 * PS, pg(60))],
        }, parent="../1", kind="pre-dump",
    )  # fmt: skip
    p3 = s.write_simple(
        str(top / "3"), 7, vmas, {
            "pid-7": [("add_parent", 0x10000, 2), ("add_zero", 0x12000, 1),
                      ("add_parent", 0x13000, 1), ("add_data", 0x14000, pg(30))],
            shm: [("add_parent", 0, 2), ("add_data", 2 * PS, pg(70)), ("add_parent", 3 * PS, 1)],
        }, parent="../2",
    )  # fmt: skip
    return p1, p2, p3


def test_three_level_chain_resolution(tmp_path):
    p1, p2, p3 = _chain(tmp_path)
    d = Dump.open(p3)
    assert [os.path.basename(c.path) for c in d.chain()] == ["3", "2", "1"]
    mem = d.read_memory(7, 0x10000, 8 * PS)
    assert mem == pg(10) + pg(20) + bytes(PS) + pg(13) + pg(30) + bytes(3 * PS)
    # shm vma maps object offset 2 pages: process page 0 = object page 2
    assert d.read_memory(7, 0x7000000, 2 * PS) == pg(70) + pg(60)
    assert Dump.open(p2).read_memory(7, 0x7000000, 2 * PS) == pg(52) + pg(60)
    assert Dump.open(p1).read_memory(7, 0x10000, 2 * PS) == pg(10, 2)
    with pytest.raises(ImageError, match=r"0x400000-0x400010 of pid 7 \(/bin/x\) is not held"):
        d.read_memory(7, 0x400000, 16)


def test_parent_must_be_complete(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "pstree").write_bytes(b"")
    with pytest.raises(ImageError, match="incomplete dump: no inventory"):
        DumpWriter(str(tmp_path / "2"), parent="../1")
    with pytest.raises(ImageError, match="must be a relative path"):
        DumpWriter(str(tmp_path / "2"), parent=str(tmp_path / "1"))
    with pytest.raises(ImageError, match="leaves"):
        DumpWriter(str(tmp_path / "2"), parent="../../x/1")
    assert sorted(os.listdir(tmp_path)) == ["1"]


@pytest.mark.parametrize("pos", [0, 1, 2047, 2048, 4094, 4095])
def test_almost_zero_pages_are_data(tmp_path, pos):
    """One non-zero byte anywhere keeps its block of pages stored as data."""
    page = bytearray(PS)
    page[pos] = 0x5A
    vmas = [s.vma_rec(0x10000, 0x30000)]
    data = bytes(8 * PS) + bytes(page) + bytes(7 * PS) + bytes(8 * PS)
    p = s.write_simple(str(tmp_path / "d"), 2, vmas, {"pid-2": [("add_data", 0x10000, data)]})
    d = Dump.open(p)
    assert [(r.where, r.nr) for r in d.page_runs("pid-2")] == [
        ("zero", 8),
        ("here", 8),
        ("zero", 8),
    ]
    assert d.read_memory(2, 0x10000, 24 * PS) == data


def test_closed_page_writers_keep_no_buffers(tmp_path):
    """Each owner's writer stays in its DumpWriter until the commit. A closed one
    kept its record packer and zero block (~160 KiB): a tree with 20,000 shared
    objects took 6 GB to dump. A thread each was started too."""
    import threading
    import tracemalloc

    with DumpWriter(str(tmp_path / "d")) as w:
        w.write_pstree([s.pstree_rec(5)])
        threads = threading.active_count()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for i in range(300):
                pw = w.open_pages(f"shm-0001-{i + 1}")
                pw.add_data(0x1000, pg(i % 250 + 1))
                pw.close()
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (after - before) / 300 < 16 * 1024, f"{(after - before) / 300:.0f} bytes each"
        assert threading.active_count() <= threads + 5  # the compress pool, one writer
        w.abort()


def _chain_of_two(tmp_path, data: bytes, zero_pages: int) -> Dump:
    """Dump 1 holds `data` then zero pages at 0x100000 (frames of two pages); dump
    2 refers to all of it as its parent's."""
    nr = len(data) // PS + zero_pages
    for name, parent in (("1", None), ("2", "../1")):
        with DumpWriter(str(tmp_path / name), "pre-dump", parent, frame_size=2 * PS) as w:
            w.write_pstree([s.pstree_rec(5)])
            w.write_core(5, s.process_rec(5), [s.thread_rec(5)])
            w.write_mm(5, s.mm_rec(), [s.vma_rec(0x100000, 0x100000 + nr * PS)])
            pw = w.open_pages("pid-5")
            if parent is None:
                pw.add_data(0x100000, data)
                pw.add_zero(0x100000 + len(data), zero_pages)
            else:
                pw.add_parent(0x100000, nr)
            pw.close()
            w.commit({"start_times": {"5": 1}})
    return Dump.open(str(tmp_path / "2"))


def test_segment_views_are_the_segments_in_place(tmp_path):
    """segment_views() gives what segments() does, as pieces of the decompressed
    frames (one per frame a run spans) instead of copies."""
    data = pg(1, 6)
    d = _chain_of_two(tmp_path, data, 2)
    start, end = 0x100000 + PS, 0x100000 + 8 * PS
    pieces = []
    for lo, hi, kind, view in d.segment_views("pid-5", start, end):
        if kind == "data":
            frame, off = view
            assert isinstance(frame, bytes) and len(frame) <= 2 * PS
            pieces.append(frame[off : off + hi - lo])
        else:
            assert kind == "zero"
            pieces.append(bytes(hi - lo))
    assert len(pieces) == 4  # data from frames 0, 1 and 2, then the zero run
    segments = d.segments("pid-5", start, end)
    copied = b"".join(got if k == "data" else bytes(hi - lo) for lo, hi, k, got in segments)
    assert b"".join(pieces) == copied == data[PS:] + bytes(2 * PS)


def test_unchanged_pages_are_found_across_frames(tmp_path):
    """The content comparison of a pass against its parent chain (shared memory,
    the full tracker): exactly the pages whose bytes differ are left out, whether
    they sit at a frame boundary or in a zero run."""
    from checkpointer.plan import ParentPages

    data = pg(1, 6)
    d = _chain_of_two(tmp_path, data, 2)
    now = bytearray(data + bytes(2 * PS))
    now[3 * PS] ^= 1  # first byte of page 3, the second of frame 1
    now[8 * PS - 1] = 7  # last byte of page 7, in the zero run
    held = [(0x100000, 0x100000 + 8 * PS)]
    same = ParentPages(d, "pid-5", held, PS).unchanged(0x100000, memoryview(now))
    assert same == [(0x100000, 0x100000 + 3 * PS), (0x100000 + 4 * PS, 0x100000 + 7 * PS)]
    # only what the chain holds is compared; an unchanged chunk is one range
    same = ParentPages(d, "pid-5", held, PS).unchanged(0x100000, memoryview(data))
    assert same == [(0x100000, 0x100000 + 6 * PS)]
