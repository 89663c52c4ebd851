"""The incremental chain stays exact through the events real programs produce.

Every pass here is checked twice: the dump's memory against the stopped process
(memcheck) and, at teardown, `verify` on every committed dump (conftest.py), which
fails on a page flagged "in the parent" that no ancestor holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from memcheck import compare_dump_with_process, read_proc_mem
from targetlib import PAGE, TRACKERS, Target, final_dump, predump, wait_for_state

from checkpointer.errors import CheckpointError
from checkpointer.images import Dump
from checkpointer.images.verify import verify_dump

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def parent_pages(path: Path, pid: int) -> int:
    return sum(r.nr for r in Dump.open(path).page_runs(f"pid-{pid}") if r.where == "parent")


def stopped_and_equal(t: Target, path: Path, *pids: int) -> None:
    for pid in pids:
        assert wait_for_state(pid, "T").startswith("T")
        compare_dump_with_process(path, pid)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_fork_between_passes(spawn, tmp_path, tracker):
    """A child forked after a reset inherits clean page-table entries (soft-dirty
    clear): it is new since the parent, which holds nothing of it."""
    t = spawn("--anon-mb", "4")
    predump(t.pid, tmp_path / "1", None, tracker)
    (child,) = [line.split()[1] for line in t.command("fork")]
    child = int(child)
    second = predump(t.pid, tmp_path / "2", "../1", tracker)
    assert second.incremental, second.full_pass_reason
    assert second.full_pids.get(child) == "new since the parent"
    assert parent_pages(tmp_path / "2", child) == 0
    assert parent_pages(tmp_path / "2", t.pid) > 0  # the rest stays incremental
    t.command("write 10 20")
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    stopped_and_equal(t, tmp_path / "3", t.pid, child)
    t.child = child  # killed at teardown


def _fork_with_pid(t: Target, want: int, tries: int = 20) -> int | None:
    """Fork a child of t that gets PID `want` (ns_last_pid), or None if another
    process on the machine keeps taking it first."""
    for _ in range(tries):
        NS_LAST_PID.write_text(str(want - 1))
        (line,) = t.command("fork")
        got = int(line.split()[1])
        if got == want:
            return got
        t.command(f"killchild {got}")
    return None


@pytest.mark.parametrize("tracker", TRACKERS)
def test_pid_reuse_between_passes(spawn, tmp_path, tracker):
    """Same PID, another process: its pages must never come from the old one."""
    if not os.access(NS_LAST_PID, os.W_OK):
        pytest.skip("needs a writable /proc/sys/kernel/ns_last_pid (root)")
    t = spawn("--anon-mb", "4")
    old = int(t.command("fork")[0].split()[1])
    predump(t.pid, tmp_path / "1", None, tracker)
    t.command(f"killchild {old}")
    t.command("write 0 200")  # the new child inherits other contents than the old one had
    new = _fork_with_pid(t, old)
    if new is None:
        pytest.skip(f"pid {old} kept being taken by other processes")
    t.child = new
    second = predump(t.pid, tmp_path / "2", "../1", tracker)
    assert second.full_pids.get(new) == "another process than the parent's with this pid"
    assert parent_pages(tmp_path / "2", new) == 0
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    stopped_and_equal(t, tmp_path / "3", t.pid, new)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_mmap_churn_during_pre_dumps(spawn, tmp_path, tracker):
    """New regions mapped and touched for the first time, and old ones unmapped,
    all the while pre-dumps run: a page first touched between reading which pages
    are present and write-protecting a new VMA was recorded "in the parent"."""
    t = spawn("--anon-mb", "4")
    t.command("churn")
    parent = None
    for i in range(1, 13):
        predump(t.pid, tmp_path / str(i), parent, tracker)
        verify_dump(str(tmp_path / str(i)))  # the first bad pass, not just the last
        parent = f"../{i}"
    final_dump(t.pid, tmp_path / "final", parent, tracker)
    stopped_and_equal(t, tmp_path / "final", t.pid)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_pre_dumps_never_split_a_region_being_remapped(spawn, tmp_path, tracker):
    """Threads map a region, touch it and move it whole with mremap, over and over,
    while pre-dumps run beside them. uffd-wp registered the VMA ranges it had read a
    moment before; a range cut into a region mapped since splits it into two VMAs,
    and mremap of a range over two VMAs fails (EFAULT): the program saw its own
    mremap fail (a C program that did not check crashed with SIGSEGV)."""
    t = spawn("--anon-mb", "4")
    t.command("movechurn 3")
    parent = None
    for i in range(1, 7):
        predump(t.pid, tmp_path / str(i), parent, tracker)
        parent = f"../{i}"
    _, moved, _, failed, _, _, err = t.command("movecount")[0].split()
    assert int(moved) > 0
    assert int(failed) == 0, f"{failed} of the target's mremap calls failed (errno {err})"
    final_dump(t.pid, tmp_path / "final", parent, tracker)
    stopped_and_equal(t, tmp_path / "final", t.pid)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_exec_between_passes(spawn, tmp_path, tracker):
    """exec keeps PID and start time but replaces all memory."""
    t = spawn("--anon-mb", "4")
    predump(t.pid, tmp_path / "1", None, tracker)
    t.command("exec")
    t.wait_ready()
    second = predump(t.pid, tmp_path / "2", "../1", tracker)
    assert not second.incremental or t.pid in second.full_pids, second
    assert parent_pages(tmp_path / "2", t.pid) == 0
    t.command("write 1 5")
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    stopped_and_equal(t, tmp_path / "3", t.pid)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_children_fork_and_exit_during_pre_dumps(spawn, tmp_path, tracker):
    """Children come and go while pre-dumps run (not frozen for uffd-wp and full)."""
    t = spawn("--anon-mb", "4")
    t.command("forker")
    parent = None
    for i in range(1, 9):
        predump(t.pid, tmp_path / str(i), parent, tracker)
        verify_dump(str(tmp_path / str(i)))
        parent = f"../{i}"
    final_dump(t.pid, tmp_path / "final", parent, tracker)
    stopped_and_equal(t, tmp_path / "final", t.pid)


def _pass_event_pass(t: Target, tmp_path: Path, tracker: str, *commands: str) -> None:
    """pre-dump, the event, incremental pre-dump, a write, final dump equal to memory."""
    predump(t.pid, tmp_path / "1", None, tracker)
    for command in commands:
        t.command(command)
    second = predump(t.pid, tmp_path / "2", "../1", tracker)
    assert second.incremental, second.full_pass_reason
    t.command("write 300 10")
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    stopped_and_equal(t, tmp_path / "3", t.pid)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_mremap_moves_a_region(spawn, tmp_path, tracker):
    """Moved page-table entries keep their (clean) dirty state at an address
    the parent never held."""
    t = spawn("--anon-mb", "4")
    _pass_event_pass(t, tmp_path, tracker, "move 100 50")


@pytest.mark.parametrize("tracker", TRACKERS)
def test_mprotect_splits_a_region(spawn, tmp_path, tracker):
    t = spawn("--anon-mb", "4")
    _pass_event_pass(t, tmp_path, tracker, "mprotect 10 20", "mprotect 500 1")


@pytest.mark.parametrize("tracker", TRACKERS)
@pytest.mark.parametrize("path", ["default", "bulk pagemap"])
def test_dontneed_then_read_maps_the_zero_page(spawn, tmp_path, tracker, path, monkeypatch):
    """MADV_DONTNEED drops pages the parent holds; a read maps the shared zero page.
    Taking them from the parent would bring the dropped data back."""
    if path == "bulk pagemap":
        from checkpointer.kernel.pagemap import Pagemap

        monkeypatch.setattr(Pagemap, "_scan_works", False)  # as on kernels before 6.7
    t = spawn("--anon-mb", "4")
    _pass_event_pass(t, tmp_path, tracker, "dontneed 10 20", "read 10 20")
    anon, _ = t.regions["anon"]
    assert t.read_mem(anon + 10 * PAGE, 20 * PAGE) == bytes(20 * PAGE)


NO_PFN_PASS = """
import sys
import time
from checkpointer.kernel import pagemap
from checkpointer.kernel.pagemap import Pagemap
assert pagemap.zero_page_pfn() is None, "PFNs are visible"
Pagemap._scan_works = sys.argv[4] == "default"
sys.path.insert(0, sys.argv[5])
from targetlib import predump
predump(int(sys.argv[1]), sys.argv[2], sys.argv[3] if sys.argv[3] != "-" else None, sys.argv[6])
"""


@pytest.mark.parametrize("tracker", TRACKERS)
@pytest.mark.parametrize("path", ["default", "bulk pagemap"])
def test_dontneed_then_read_without_pfns(spawn, tmp_path, tracker, path):
    """The same, with the pagemap as a user without CAP_SYS_ADMIN sees it: every
    PFN reads 0, so the zero page cannot be recognized by its frame number."""
    t = spawn("--anon-mb", "4")

    def pass_without_cap_sys_admin(name: str, parent: str) -> None:
        subprocess.run(
            [
                "setpriv",
                "--inh-caps=-sys_admin",
                "--bounding-set=-sys_admin",
                sys.executable,
                "-c",
                NO_PFN_PASS,
                str(t.pid),
                str(tmp_path / name),
                parent,
                path,
                str(Path(__file__).parent),
                tracker,
            ],
            check=True,
        )

    pass_without_cap_sys_admin("1", "-")
    t.command("dontneed 10 20")
    t.command("read 10 20")
    pass_without_cap_sys_admin("2", "../1")
    t.command("write 300 10")
    final_dump(t.pid, tmp_path / "3", "../2", tracker)
    stopped_and_equal(t, tmp_path / "3", t.pid)


@pytest.mark.uffd_wp
def test_injected_userfaultfd_is_placed_high_and_left_out_of_the_records(spawn, tmp_path):
    """A daemon that closes and reopens 0-2 must not get the tool's userfaultfd, and
    a dump records the target's own fds and memory flags, not the tool's."""
    from checkpointer.kernel import uffd

    t = spawn("--anon-mb", "4")
    predump(t.pid, tmp_path / "1", None, "uffd-wp")
    fd = uffd.find_target_uffd(t.pid)
    assert fd is not None and fd >= 512, fd
    final_dump(t.pid, tmp_path / "2", "../1", "uffd-wp")
    d = Dump.open(tmp_path / "2")
    assert not [r for r in d.fds(t.pid) if "userfaultfd" in r["target"]]
    assert not [v for v in d.mm(t.pid).vmas if "uw" in v["vmflags"]]


@pytest.mark.parametrize("tracker", TRACKERS)
def test_main_thread_exited_while_others_run(spawn, tmp_path, tracker):
    """pthread_exit in main: the thread-group leader is a zombie, the process runs
    on in its other threads, which the freezer must still stop and dump."""
    t = spawn("--main-exits")
    assert wait_for_state_of_task(t.pid, t.pid, "Z")
    predump(t.pid, tmp_path / "1", None, tracker)
    t.command("write 5 5")
    res = final_dump(t.pid, tmp_path / "2", "../1", tracker)
    assert res.pids == [t.pid]
    live = set(os.listdir(f"/proc/{t.pid}/task")) - {str(t.pid)}
    threads = {str(r["tid"]) for r in Dump.open(tmp_path / "2").core(t.pid).threads}
    assert live <= threads
    assert all(wait_for_state_of_task(t.pid, int(tid), "T") for tid in live)
    compare_dump_with_process(tmp_path / "2", t.pid)


def wait_for_state_of_task(pid: int, tid: int, letter: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == letter:
                return True
        time.sleep(0.01)
    return False


@pytest.mark.uffd_wp
def test_target_with_its_own_userfaultfd_write_protection(spawn, tmp_path):
    """A region the target write-protects with its own (synchronous) userfaultfd
    shows the same "uw" VmFlag and write-protect bits as the tool's tracking, but
    a write the target makes (unprotect, write, protect) leaves no trace the tool
    can read: its pages must be copied every pass, never taken from the parent."""
    t = spawn("--anon-mb", "4")
    reply = t.command("ownwp")
    if reply[0].startswith("NOUFFD"):
        pytest.skip(f"the target cannot use userfaultfd here ({reply[0]})")
    predump(t.pid, tmp_path / "1", None, "uffd-wp")
    t.command("ownwrite")
    second = predump(t.pid, tmp_path / "2", "../1", "uffd-wp")
    assert second.incremental, second.full_pass_reason
    t.command("ownwrite")
    predump(t.pid, tmp_path / "3", "../2", "uffd-wp")
    # Only commands write that region: the chain must hold it as it is now.
    _, _, addr, size = reply[0].split()
    start, end = int(addr, 16), int(addr, 16) + int(size)
    with Dump.open(str(tmp_path / "3")) as d:
        held = b"".join(
            data if kind == "data" else bytes(hi - lo)
            for lo, hi, kind, data in d.segments(f"pid-{t.pid}", start, end)
        )
    assert held == read_proc_mem(t.pid, start, end - start)
    # Its own userfaultfd cannot be restored: the final dump names it.
    with pytest.raises(CheckpointError, match=r"\(anon_inode:\[userfaultfd\]\): this kind"):
        final_dump(t.pid, tmp_path / "4", "../3", "uffd-wp")


DYING_CHILD = """
import mmap, os, sys, time
child = os.fork()
if child == 0:
    m = mmap.mmap(-1, 3 << 30)
    for i in range(0, 3 << 30, 4096):
        m[i] = 1
    print("child ready", flush=True)
    time.sleep(1000)
print(child, flush=True)
os.waitpid(child, 0)
print("reaped", flush=True)
time.sleep(1000)
"""


@pytest.mark.parametrize("tracker", TRACKERS)
def test_child_dying_slowly_during_a_pre_dump(tmp_path, tracker):
    """A killed child with gigabytes to free stays "R" for seconds while the kernel
    tears its memory down (PF_EXITING): a pre-dump then must leave it out, as it
    does a zombie. (postgres: a backend that ended during a converge failed it with
    "process N does not exist (exited)".)"""
    root = subprocess.Popen([sys.executable, "-c", DYING_CHILD], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        child = int(root.stdout.readline())
        assert root.stdout.readline() == "child ready\n"
        predump(root.pid, tmp_path / "1", None, tracker)
        os.kill(child, 9)
        time.sleep(0.05)
        # still tearing its memory down (else this test shows nothing)
        assert open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] in "RD"
        second = predump(root.pid, tmp_path / "2", "../1", tracker)
        assert child not in second.pids
        assert root.stdout.readline() == "reaped\n"
        final = final_dump(root.pid, tmp_path / "3", "../2", tracker)
        assert final.pids == [root.pid]
        verify_dump(str(tmp_path / "3"))
    finally:
        root.kill()
        root.wait()
