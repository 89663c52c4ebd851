"""Dirty-page trackers and the incremental pre-dump chain, on real targets.

Each tracker test runs where the kernel has what the tracker needs: uffd-wp and
full natively, soft-dirty inside the QEMU guest (scripts/vm-run).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from memcheck import compare_dump_with_process
from targetlib import PAGE, TRACKERS, final_dump, predump, proc_status, wait_for_state

from checkpointer.dump import DumpRequest, dump
from checkpointer.errors import TargetError
from checkpointer.freezer import Thaw
from checkpointer.images import Dump


@pytest.mark.parametrize("tracker", TRACKERS)
def test_chain_is_exact_while_target_keeps_writing(spawn, tmp_path, tracker):
    t = spawn("--anon-mb", "16", "--hot-pages", "64", "--hot-sleep-us", "200", "--fork")
    first = predump(t.pid, tmp_path / "1", tracker=tracker)
    assert first.tracker == tracker and not first.incremental
    t.command("write 100 50")
    second = predump(t.pid, tmp_path / "2", "../1", tracker)
    assert second.incremental, second.full_pass_reason
    t.command("write 300 20")
    final = final_dump(t.pid, tmp_path / "3", "../2", tracker)
    assert final.incremental
    assert wait_for_state(t.pid, "T").startswith("T")
    compare_dump_with_process(tmp_path / "3", t.pid)
    compare_dump_with_process(tmp_path / "3", t.child)
    # Incremental passes copy a small part of what the first one did.
    assert second.stats["pages_written"] < first.stats["pages_written"] / 4
    assert second.stats["pages_skipped_parent"] > 0
    assert final.stats["pages_skipped_parent"] > 0


@pytest.mark.parametrize("tracker", TRACKERS)
def test_written_pages_are_the_ones_copied(spawn, tmp_path, tracker):
    t = spawn("--anon-mb", "32")
    predump(t.pid, tmp_path / "1", tracker=tracker)
    t.command("write 1000 200")
    second = predump(t.pid, tmp_path / "2", "../1", tracker)
    # The 200 written pages, plus a little the target's threads touch (stacks).
    assert 200 <= second.stats["pages_written"] + second.stats["pages_zero"] < 400
    anon, _ = t.regions["anon"]
    held = [
        r
        for r in Dump.open(tmp_path / "2").page_runs(f"pid-{t.pid}")
        if r.where == "here" and anon <= r.addr < anon + (32 << 20)
    ]
    pages = {r.addr + i * PAGE for r in held for i in range(r.nr)}
    assert {anon + (1000 + i) * PAGE for i in range(200)} <= pages


@pytest.mark.parametrize("tracker", TRACKERS)
def test_vma_changes_between_iterations(spawn, tmp_path, tracker):
    t = spawn("--anon-mb", "8", "--remap")
    predump(t.pid, tmp_path / "1", tracker=tracker)
    remap_addr, _ = t.regions["remap"]
    t.command(f"remap {remap_addr:#x}")  # unmap, then map new contents at the same place
    t.command("mmap")  # a new VMA
    t.command("dontneed 10 20")  # pages dropped: must read back as zeros
    t.command("mprotect 40 8")  # re-protected: splits the anon VMA
    predump(t.pid, tmp_path / "2", "../1", tracker)
    t.command(f"remap {remap_addr:#x}")
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    compare_dump_with_process(tmp_path / "3", t.pid)
    new, size = t.regions["new"]
    assert Dump.open(tmp_path / "3").read_memory(t.pid, new, size) == t.read_mem(new, size)


@pytest.mark.softdirty
def test_soft_dirty_new_vma_at_same_address_reads_dirty(spawn, tmp_path):
    """The kernel's answer to unmap-then-map at the same address: the new VMA is
    soft-dirty as a whole, so its pages are copied although they were never
    written after the last clear."""
    t = spawn("--anon-mb", "4", "--remap")
    predump(t.pid, tmp_path / "1", tracker="soft-dirty")
    addr, size = t.regions["remap"]
    t.command(f"remap {addr:#x}")
    second = predump(t.pid, tmp_path / "2", "../1", "soft-dirty")
    # Copied, not taken from the parent: stored here (or as zeros, for the
    # all-zero page of the new contents).
    copied = {
        r.addr + i * PAGE
        for r in Dump.open(tmp_path / "2").page_runs(f"pid-{t.pid}")
        if r.where in ("here", "zero")
        for i in range(r.nr)
    }
    assert {addr + i * PAGE for i in range(size // PAGE)} <= copied
    assert second.incremental


@pytest.mark.uffd_wp
def test_uffd_wp_pre_dump_never_freezes_and_untrack_leaves_no_trace(spawn, tmp_path):
    t = spawn("--anon-mb", "8")
    predump(t.pid, tmp_path / "1", tracker="uffd-wp")
    second = predump(t.pid, tmp_path / "2", "../1", "uffd-wp")
    assert second.stats["frozen_time"] == 0 and second.stats["freezing_time"] == 0
    smaps = open(f"/proc/{t.pid}/smaps").read()
    assert " uw" in smaps
    r = subprocess.run(
        ["checkpointer", "untrack", "-t", str(t.pid)],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert r.returncode == 0, r.stderr
    assert " uw" not in open(f"/proc/{t.pid}/smaps").read()
    fds = [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in os.listdir(f"/proc/{t.pid}/fd")]
    assert "anon_inode:[userfaultfd]" not in fds
    assert proc_status(t.pid)["TracerPid"] == "0"


def _userfaultfds(pid: int) -> list[int]:
    return [
        int(n)
        for n in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{n}") == "anon_inode:[userfaultfd]"
    ]


@pytest.mark.uffd_wp
def test_dumps_after_uffd_wp_tracking_see_its_traces_as_the_tools(spawn, tmp_path):
    """A dump that tracks nothing itself (no parent, no --track-mem), after uffd-wp
    pre-dumps left their userfaultfd in the target (a converge --leave-running, a
    migration rolled back), refused it as the program's: "fd N (anon_inode:
    [userfaultfd]): this kind of file cannot be dumped". A pass with another
    tracker forgot it, so the next uffd-wp pass made a second one. Now a plain dump
    hides it and leaves tracking alone; another tracker removes it first."""
    t = spawn("--anon-mb", "8")
    predump(t.pid, tmp_path / "1", tracker="uffd-wp")
    (fd,) = _userfaultfds(t.pid)
    child = int(t.command("fork")[0].split()[1])  # it holds the same userfaultfd
    assert _userfaultfds(child) == [fd]
    plain = dump(DumpRequest(t.pid, tmp_path / "plain", thaw=Thaw.RUNNING, progress=False))
    assert not plain.incremental
    with Dump.open(tmp_path / "plain") as d:
        assert fd not in [r["fd"] for r in d.fds(t.pid)]
        assert fd not in [r["fd"] for r in d.fds(child)]
    assert _userfaultfds(t.pid) == [fd]  # tracking goes on: the chain can grow
    second = predump(t.pid, tmp_path / "2", "../1", "uffd-wp")
    assert second.incremental, second.full_pass_reason
    final_dump(t.pid, tmp_path / "full", None, "full", thaw=Thaw.RUNNING)
    assert _userfaultfds(t.pid) == []
    assert " uw" not in open(f"/proc/{t.pid}/smaps").read()
    predump(t.pid, tmp_path / "3", tracker="uffd-wp")
    assert len(_userfaultfds(t.pid)) == 1
    final_dump(t.pid, tmp_path / "4", "../3", "uffd-wp")
    compare_dump_with_process(tmp_path / "4", t.pid)


@pytest.mark.uffd_wp
def test_uffd_wp_lost_registration_forces_full_pass(spawn, tmp_path):
    t = spawn("--anon-mb", "8")
    predump(t.pid, tmp_path / "1", tracker="uffd-wp")
    subprocess.run(["checkpointer", "untrack", "-t", str(t.pid)], check=True, capture_output=True)
    second = predump(t.pid, tmp_path / "2", "../1", "uffd-wp")
    assert not second.incremental and second.full_pass_reason


@pytest.mark.parametrize("tracker", [pytest.param("uffd-wp", marks=pytest.mark.uffd_wp), "full"])
def test_disk_full_pre_dump_never_becomes_parent_and_next_is_full(spawn, tmp_path, tracker):
    """A pre-dump that fails after resetting tracking (here: the disk fills) leaves
    nothing visible, and the next pass on top of the last good dump is a full one."""
    t = spawn("--anon-mb", "16")
    chain = tmp_path / "chain"
    chain.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(chain)], check=True)
    try:
        predump(t.pid, chain / "1", tracker=tracker)
        free = os.statvfs(chain).f_bavail * os.statvfs(chain).f_frsize
        with open(chain / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - (32 << 10))
        t.command("write 0 2000")
        with pytest.raises(OSError):
            predump(t.pid, chain / "2", "../1", tracker)
        assert sorted(p.name for p in chain.iterdir()) == ["1", "filler"]
        (chain / "filler").unlink()
        assert t.alive() and proc_status(t.pid)["TracerPid"] == "0"
        third = predump(t.pid, chain / "3", "../1", tracker)
        if tracker == "full":
            assert third.incremental  # content comparison needs no kernel state
        else:
            assert not third.incremental and "full pass" in third.full_pass_reason
        final_dump(t.pid, chain / "4", "../3", tracker)
        compare_dump_with_process(chain / "4", t.pid)
    finally:
        subprocess.run(["umount", "-l", str(chain)], check=True)


def test_parent_from_another_process_is_refused(spawn, tmp_path):
    a = spawn()
    b = spawn()
    predump(a.pid, tmp_path / "a", tracker="full")
    with pytest.raises(TargetError, match="another process"):
        predump(b.pid, tmp_path / "b", "../a", "full")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("tracker", TRACKERS)
def test_shared_memory_is_incremental_by_content(spawn, tmp_path, tracker):
    """Shared memory escapes every tracker (writes through another mapping), so
    each pass compares it with the parent: unchanged pages are the parent's,
    a page changed since is copied again."""
    t = spawn("--anon-mb", "4")
    predump(t.pid, tmp_path / "1", tracker=tracker)
    predump(t.pid, tmp_path / "2", "../1", tracker)
    addr, size = t.regions["shared"]
    owner = next(o for o in Dump.open(tmp_path / "2").owners() if o.startswith("shm-"))
    runs = list(Dump.open(tmp_path / "2").page_runs(owner))
    assert sum(r.nr for r in runs if r.where == "parent") == size // PAGE
    with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:  # a write no tracker sees
        os.pwrite(mem.fileno(), b"changed", addr + 3 * PAGE)
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    runs = list(Dump.open(tmp_path / "3").page_runs(owner))
    assert sum(r.nr for r in runs if r.where == "here") == 1
    compare_dump_with_process(tmp_path / "3", t.pid)
