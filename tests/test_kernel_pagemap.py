"""pagemap reads, byte-level run finders, PAGEMAP_SCAN, clear_refs (soft-dirty)."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import struct

import pytest
from targetlib import wait_for_state

from checkpointer.errors import TargetError
from checkpointer.kernel import pagemap as pm
from checkpointer.kernel.syscalls import NR_madvise, NR_prctl, munmap, syscall
from checkpointer.kernel.syscalls import mmap_anon as _mmap_anon

P = pm.PAGE_SIZE
PR_SET_THP_DISABLE = 41


MADV_NOHUGEPAGE = 15


def mmap_anon(length: int) -> int:
    """An anonymous mapping of ours that stays in 4 KiB pages whatever the THP mode."""
    addr = _mmap_anon(length)
    syscall(NR_madvise, addr, length, MADV_NOHUGEPAGE)
    return addr


@pytest.fixture
def spawn_no_thp(spawn):
    """spawn() with transparent huge pages disabled in the target (PR_SET_THP_DISABLE
    is inherited across fork and exec): tests that count 4 KiB pages need that on
    kernels with THP "always" (the QEMU guest's Debian kernel)."""

    def _spawn(*args: str):
        syscall(NR_prctl, PR_SET_THP_DISABLE, 1, 0, 0, 0)
        try:
            return spawn(*args)
        finally:
            syscall(NR_prctl, PR_SET_THP_DISABLE, 0, 0, 0, 0)

    return _spawn


def slow_runs(entries: bytes, start: int, pred) -> list[tuple[int, int]]:
    """Reference: one Python step per entry."""
    runs: list[tuple[int, int]] = []
    for i, (e,) in enumerate(struct.iter_unpack("<Q", entries)):
        if pred(e):
            if runs and runs[-1][0] + runs[-1][1] * P == start + i * P:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((start + i * P, 1))
    return runs


def random_entries(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    flags = [0, pm.PM_PRESENT, pm.PM_SWAP, pm.PM_PRESENT | pm.PM_FILE, pm.PM_SOFT_DIRTY]
    out = []
    for _ in range(n):
        e = 0
        for f in rnd.sample(flags, rnd.randint(0, 3)):
            e |= f
        pfn = rnd.choice([0x1234, 0x5678, rnd.getrandbits(55)])
        out.append(e | (pfn if e & pm.PM_PRESENT else 0) | (rnd.getrandbits(1) << 56))
    return struct.pack(f"<{n}Q", *out)


@pytest.mark.parametrize("seed", range(5))
def test_run_finders_match_slow_reference(seed):
    start = 0x7F0000000000
    entries = random_entries(2000, seed)
    both = pm.PM_PRESENT | pm.PM_SWAP
    assert pm.present_runs(entries, start) == slow_runs(entries, start, lambda e: e & both)
    assert pm.present_runs(entries, start, exclude_file=True) == slow_runs(
        entries, start, lambda e: e & both and not e & pm.PM_FILE
    )
    assert pm.present_runs(entries, start, exclude_pfn=0x1234) == slow_runs(
        entries,
        start,
        lambda e: e & both and not (e & pm.PM_PRESENT and e & pm.PM_PFN_MASK == 0x1234),
    )
    assert pm.soft_dirty_runs(entries, start) == slow_runs(
        entries, start, lambda e: e & both and e & pm.PM_SOFT_DIRTY
    )


def test_run_finders_edges():
    assert pm.present_runs(b"", 0) == []
    one = struct.pack("<Q", pm.PM_PRESENT)
    none = bytes(8)
    assert pm.present_runs(one * 3, 0x1000) == [(0x1000, 3)]
    assert pm.present_runs(none + one + none + one * 2, 0) == [(P, 1), (3 * P, 2)]


def test_run_finders_over_1gib_of_entries():
    """Dense and sparse 1 GiB pagemaps (speed is measured in scripts/bench, not here)."""
    n = 262144  # 1 GiB of 4 KiB pages
    dense = struct.pack("<Q", pm.PM_PRESENT | 0x42) * n
    assert pm.present_runs(dense, 0) == [(0, n)]
    sparse = (struct.pack("<Q", pm.PM_PRESENT) + bytes(8 * 63)) * (n // 64)
    assert len(pm.present_runs(sparse, 0)) == n // 64


def anon_expected_present(start: int, size: int) -> list[tuple[int, int]]:
    """target.c fill(seed 0) leaves page pg untouched when pg % 64 == 0."""
    runs = []
    for pg in range(size // P):
        if pg % 64:
            if runs and runs[-1][0] + runs[-1][1] * P == start + pg * P:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((start + pg * P, 1))
    return runs


def test_present_runs_of_a_target(spawn_no_thp):
    t = spawn_no_thp()
    start, size = t.regions["anon"]
    with pm.Pagemap(t.pid) as pmap:
        entries = pmap.read(start, start + size)
        assert len(entries) == size // P * 8
        assert pm.present_runs(entries, start) == anon_expected_present(start, size)
        ustart, usize = t.regions["untouched"]
        assert pm.present_runs(pmap.read(ustart, ustart + usize), ustart) == []
    assert pm.read_pagemap(t.pid, start, start + size) == entries


@pytest.mark.pagemap_scan
def test_pagemap_scan_present_equals_present_runs(spawn_no_thp):
    from checkpointer.kernel import proc, ptrace

    t = spawn_no_thp("--threads", "2")
    tids = proc.list_threads(t.pid)
    for tid in tids:  # frozen: its threads' stacks must not change between the two reads
        ptrace.seize(tid)
        ptrace.interrupt(tid)
    for tid in tids:
        ptrace.wait_stop(tid)
    try:
        with pm.Pagemap(t.pid) as pmap:
            for m in proc.read_maps(t.pid):
                if m.path.startswith("[v"):  # vdso/vvar/vsyscall: special mappings
                    continue
                runs = pm.present_runs(pmap.read(m.start, m.end), m.start)
                regions = pmap.scan(
                    m.start,
                    m.end,
                    category_mask=pm.PAGE_IS_PRESENT,
                    return_mask=pm.PAGE_IS_PRESENT,
                )
                scanned = [(lo, (hi - lo) // pm.PAGE_SIZE) for lo, hi, _ in regions]
                assert scanned == runs, f"{m.start:#x}-{m.end:#x} {m.path}"
    finally:
        for tid in tids:
            ptrace.detach(tid)


@pytest.mark.pagemap_scan
def test_pagemap_scan_small_vector_and_max_pages(spawn_no_thp):
    t = spawn_no_thp()
    start, size = t.regions["anon"]
    want = [(a, a + n * P, pm.PAGE_IS_PRESENT) for a, n in anon_expected_present(start, size)]
    with pm.Pagemap(t.pid) as pmap:
        kw = dict(category_mask=pm.PAGE_IS_PRESENT, return_mask=pm.PAGE_IS_PRESENT)
        assert pmap.scan(start, start + size, vec_len=3, **kw) == want
        limited = pmap.scan(start, start + size, max_pages=10, **kw)
        assert sum((hi - lo) // P for lo, hi, _ in limited) == 10
        assert limited[0][0] == want[0][0]  # the limit cuts the first run short
    assert pm.pagemap_scan(t.pid, start, start + size, **kw) == want


@pytest.mark.pagemap_scan
def test_zero_page_pfn_excluded():
    pfn = pm.zero_page_pfn()
    if pfn is None:
        pytest.skip("PFNs hidden (no CAP_SYS_ADMIN)")
    n = 16
    addr = mmap_anon(n * P)
    try:
        for i in range(n):
            if i < 8:
                _ = ctypes.c_char.from_address(addr + i * P).value  # read: zero page
            else:
                ctypes.c_char.from_address(addr + i * P).value = b"x"
        entries = pm.read_pagemap(os.getpid(), addr, addr + n * P)
        assert pm.present_runs(entries, addr) == [(addr, 16)]
        assert pm.present_runs(entries, addr, exclude_pfn=pfn) == [(addr + 8 * P, 8)]
        zero = pm.pagemap_scan(
            os.getpid(),
            addr,
            addr + n * P,
            category_mask=pm.PAGE_IS_PFNZERO,
            return_mask=pm.PAGE_IS_PFNZERO,
        )
        assert zero == [(addr, addr + 8 * P, pm.PAGE_IS_PFNZERO)]
    finally:
        munmap(addr, n * P)


def test_missing_process():
    with pytest.raises(TargetError):
        pm.Pagemap(2**22 + 99)
    with pytest.raises(TargetError):
        pm.clear_soft_dirty(2**22 + 99)


@pytest.mark.softdirty
def test_soft_dirty_runs_after_clear_refs(spawn_no_thp):
    t = spawn_no_thp()
    start, size = t.regions["anon"]
    pm.clear_soft_dirty(t.pid)
    with pm.Pagemap(t.pid) as pmap:
        assert pm.soft_dirty_runs(pmap.read(start, start + size), start) == []
        t.command("write 10 20")
        runs = pm.soft_dirty_runs(pmap.read(start, start + size), start)
        assert runs == [(start + 10 * P, 20)]
        pm.clear_soft_dirty(t.pid)
        t.command("write 100 1")
        t.command("write 200 3")
        runs = pm.soft_dirty_runs(pmap.read(start, start + size), start)
        assert runs == [(start + 100 * P, 1), (start + 200 * P, 3)]


@pytest.mark.softdirty
def test_soft_dirty_read_now_worked_out_later_answers_for_the_read(spawn_no_thp):
    """data_and_soft_dirty_later reads the kernel's entries at once and turns them
    into ranges only when called (a soft-dirty pre-dump does that after its
    thaw): writes and unmaps between the two must not show."""
    t = spawn_no_thp()
    start, size = t.regions["anon"]
    pm.clear_soft_dirty(t.pid)
    t.command("write 10 20")
    with pm.Pagemap(t.pid) as pmap:
        later = pmap.data_and_soft_dirty_later(start, start + size)
        present_then = pmap.data_runs(start, start + size)  # the target is idle
        pm.clear_soft_dirty(t.pid)
        t.command("write 100 5")
        t.command("dontneed 0 64")
        assert pmap.data_runs(start, start + size) != present_then
        present, dirty = later()
    assert dirty == [(start + 10 * P, start + 30 * P)]
    assert present == present_then


def test_data_runs_skip_clean_file_pages_and_holes(spawn_no_thp, mapped_file):
    t = spawn_no_thp("--file", str(mapped_file))
    start, size = t.regions["anon"]
    with pm.Pagemap(t.pid) as pmap:
        want = [(a, a + n * P) for a, n in anon_expected_present(start, size)]
        assert pmap.data_runs(start, start + size) == want
        # target.c reads every page of its private file mapping, writes every 4th
        fstart, fsize = t.regions["file"]
        entries = pmap.read(fstart, fstart + fsize)
        assert pm.present_runs(entries, fstart) == [(fstart, fsize // P)]
        assert pm.data_runs(entries, fstart) == [
            (fstart + i * P, fstart + (i + 1) * P) for i in range(0, fsize // P, 4)
        ]


def test_data_runs_skip_the_zero_page():
    if pm.zero_page_pfn() is None:
        pytest.skip("PFNs hidden (no CAP_SYS_ADMIN)")
    addr = mmap_anon(4 * P)
    try:
        _ = ctypes.c_char.from_address(addr).value  # zero page
        ctypes.c_char.from_address(addr + 2 * P).value = b"x"
        entries = pm.read_pagemap(os.getpid(), addr, addr + 4 * P)
        assert pm.data_runs(entries, addr) == [(addr + 2 * P, addr + 3 * P)]
        assert pm.data_runs(entries, addr, skip_zero_page=False) == [
            (addr, addr + P),
            (addr + 2 * P, addr + 3 * P),
        ]
        with pm.Pagemap(os.getpid()) as pmap:  # by PAGEMAP_SCAN where there is one
            for anon in (False, True):
                assert pmap.data_runs(addr, addr + 4 * P, anon) == [(addr + 2 * P, addr + 3 * P)]
    finally:
        munmap(addr, 4 * P)


@pytest.mark.pagemap_scan
@pytest.mark.parametrize("vec_len", [1, 7, 512, 1024, 4096])
@pytest.mark.parametrize("n", [1026, 1200, 3000])
def test_pagemap_scan_many_regions_no_duplicates(vec_len, n):
    """More than 512 regions (the kernel's bounce buffer): 6.18 then returns regions
    beyond walk_end, so the next round repeats them; the result must still be exact."""
    addr = mmap_anon(n * P)
    try:
        for i in range(0, n, 2):
            ctypes.c_char.from_address(addr + i * P).value = b"x"
        with pm.Pagemap(os.getpid()) as pmap:
            regions = pmap.scan(
                addr,
                addr + n * P,
                category_mask=pm.PAGE_IS_PRESENT,
                return_mask=pm.PAGE_IS_PRESENT,
                vec_len=vec_len,
            )
        assert regions == [
            (addr + i * P, addr + (i + 1) * P, pm.PAGE_IS_PRESENT) for i in range(0, n, 2)
        ]
    finally:
        munmap(addr, n * P)


@pytest.mark.pagemap_scan
def test_data_runs_by_scan_equal_data_runs_by_read(spawn_no_thp, mapped_file):
    """Pagemap.data_runs takes PAGEMAP_SCAN's ranges; they must be what the bulk
    read of raw entries gives, on every VMA of a target."""
    from checkpointer.collect import read_vmas

    t = spawn_no_thp("--file", str(mapped_file))
    os.kill(t.pid, signal.SIGSTOP)  # its threads must not fault pages in between
    assert wait_for_state(t.pid, "T").startswith("T")
    with pm.Pagemap(t.pid) as pmap:
        for vma in read_vmas(t.pid):
            if vma.path in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue
            by_read = pm.data_runs(pmap.read(vma.start, vma.end), vma.start)
            assert pmap.data_runs(vma.start, vma.end) == by_read, vma
            # The cheaper scan of anonymous memory (no PAGE_IS_FILE) finds the same.
            if vma.anonymous:
                assert pmap.data_runs(vma.start, vma.end, anon=True) == by_read, vma
            if vma.path == str(mapped_file):
                assert not vma.anonymous


@pytest.fixture
def bulk_read_only(monkeypatch):
    """Pagemap answers from the bulk read of raw entries, as on a kernel without
    PAGEMAP_SCAN (before 6.7: the 6.1 guest)."""
    monkeypatch.setattr(pm.Pagemap, "_scan_works", False)


def test_bulk_read_in_chunks_gives_the_runs_of_one_read(spawn_no_thp, monkeypatch, bulk_read_only):
    """The bulk read goes through a VMA a chunk at a time: the runs, joined across
    chunk ends, must be those of one read of the whole VMA (chunks of 173 pages
    here, so their ends fall inside runs of target.c's mixed memory)."""
    t = spawn_no_thp()
    start, size = t.regions["anon"]
    os.kill(t.pid, signal.SIGSTOP)
    assert wait_for_state(t.pid, "T").startswith("T")
    with pm.Pagemap(t.pid) as pmap:
        entries = pmap.read(start, start + size)
        whole = pm.data_runs(entries, start)
        whole_dirty = pm.data_and_soft_dirty_runs(entries, start)
        monkeypatch.setattr(pm, "BULK_PAGES", 173)
        assert size // P > 10 * 173 and len(whole) > 10
        assert pmap.data_runs(start, start + size) == whole
        for keep in (True, False):
            later = pmap.data_and_soft_dirty_later(start, start + size, keep_entries=keep)
            assert later() == whole_dirty == (whole, whole_dirty[1])


def test_bulk_read_of_a_huge_reservation_stays_small(monkeypatch, bulk_read_only):
    """An 8 GiB PROT_NONE reservation (as JVMs and Go make) is read a chunk at a
    time: no read of more than BULK_PAGES entries, where one read used to take
    16 MiB (a 512 GiB one: 1 GiB)."""
    size = 8 << 30
    addr = _mmap_anon(size, prot=0)
    sizes = []
    real_read = pm.Pagemap.read

    def read(self, start, end):
        sizes.append(end - start)
        return real_read(self, start, end)

    monkeypatch.setattr(pm.Pagemap, "read", read)
    try:
        with pm.Pagemap(os.getpid()) as pmap:
            assert pmap.data_runs(addr, addr + size) == []
            assert pmap.data_and_soft_dirty_later(addr, addr + size)() == ([], [])
    finally:
        munmap(addr, size)
    assert sizes and max(sizes) <= pm.BULK_PAGES * P < size


def test_union_of_scan_rounds_drops_nothing():
    """Logic only: a later round's region overlapping an earlier one is kept (its
    pages were written again), touching ones join, categories are united."""
    W, S = pm.PAGE_IS_WRITTEN, pm.PAGE_IS_SWAPPED
    assert pm.union_regions([]) == []
    assert pm.union_regions([(0, P, W), (P, 2 * P, W), (3 * P, 4 * P, W)]) == [
        (0, 2 * P, W),
        (3 * P, 4 * P, W),
    ]
    # Round two starts inside round one and reports a page round one had not.
    rounds = [(0, P, W), (4 * P, 5 * P, W), (2 * P, 3 * P, W), (4 * P, 6 * P, W)]
    assert pm.union_regions(rounds) == [(0, P, W), (2 * P, 3 * P, W), (4 * P, 6 * P, W)]
    assert pm.union_regions([(0, 2 * P, W), (P, 3 * P, S)]) == [
        (0, P, W),
        (P, 2 * P, W | S),
        (2 * P, 3 * P, S),
    ]
