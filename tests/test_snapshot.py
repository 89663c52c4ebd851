"""The copy-on-write snapshot: a leave-running dump of a target that never stops
writing holds its memory at the instant of the freeze, and leaves no trace."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from targetlib import CLI, Target, proc_status, start_target, target_binary

from checkpointer.dump import DumpRequest, dump, pre_dump
from checkpointer.freezer import Thaw
from checkpointer.images import Dump
from checkpointer.images.verify import verify_dump

SOURCE = Path(__file__).parent / "targets" / "generations.c"
PAGE = os.sysconf("SC_PAGE_SIZE")
SEQUENCE = ("private", "dontfork", "wipeonfork", "shared")  # the writer's page order


@pytest.fixture
def writer():
    """Start generations.c targets; killed at teardown."""
    started: list[Target] = []

    def _start(mb: int = 32) -> Target:
        proc = subprocess.Popen(
            [str(target_binary(SOURCE)), "--mb", str(mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        target = Target(proc)
        started.append(target)
        assert proc.stdout
        while not (line := proc.stdout.readline().strip()).startswith("READY"):
            assert line, f"target exited early with {proc.wait()}"
            target._parse(line)
        # Past the first sweep, so "the previous generation" is defined everywhere.
        while int.from_bytes(target.read_mem(target.regions["clock"][0], 8), "little") >> 32 < 2:
            time.sleep(0.001)
        return target

    yield _start
    for target in started:
        target.kill()


def first_words(read, target: Target) -> list[int]:
    """The generation in each page of the writer's sequence, read through `read`."""
    words = []
    for name in SEQUENCE:
        addr, size = target.regions[name]
        data = read(addr, size)
        words += [int.from_bytes(data[off : off + 8], "little") for off in range(0, size, PAGE)]
    return words


def assert_one_instant(dumped: Dump, target: Target) -> int:
    """The dump obeys the writer's invariant for the clock it holds; the clock's g."""
    clock = int.from_bytes(dumped.read_memory(target.pid, target.regions["clock"][0], 8), "little")
    g, i = clock >> 32, clock & 0xFFFFFFFF
    words = first_words(lambda a, n: dumped.read_memory(target.pid, a, n), target)
    assert words[:i] == [g] * i, "pages before the clock's index are not at its generation"
    assert words[i] in (g - 1, g)
    assert words[i + 1 :] == [g - 1] * (len(words) - i - 1), "pages after the index moved on"
    # The fixed pattern survived in every kind of region (a wiped copy loses it).
    for n, name in enumerate(SEQUENCE):
        addr, size = target.regions[name]
        page = dumped.read_memory(target.pid, addr + size - PAGE, PAGE)
        index = sum(target.regions[s][1] // PAGE for s in SEQUENCE[:n]) + size // PAGE - 1
        assert page[8:] == bytes((index * 7 + k) & 0xFF for k in range(8, PAGE)), name
    return g


def children(pid: int) -> set[int]:
    return {
        int(c)
        for tid in os.listdir(f"/proc/{pid}/task")
        for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
    }


def is_child_of(pid: int, parent: int) -> bool:
    """pid exists and is parent's child (pids are reused quickly on a busy machine)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == parent


def tracer(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    return int(status.split("TracerPid:")[1].split()[0])


def fd_state(pid: int) -> dict[str, tuple[str, str]]:
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
        fds[fd] = (os.readlink(f"/proc/{pid}/fd/{fd}"), "\n".join(info[:3]))
    return fds


def test_snapshot_dump_is_the_memory_at_the_freeze(writer, tmp_path):
    t = writer()
    kids, fds = children(t.pid), fd_state(t.pid)
    res = dump(DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False))
    assert res.stats["snapshot"] == "copy-on-write"
    g = assert_one_instant(Dump.open(tmp_path / "d"), t)
    # It ran on meanwhile (the dump is not just a copy taken later), and nothing of
    # the snapshot is left: no child, same fds.
    time.sleep(0.05)
    now = first_words(t.read_mem, t)
    assert max(now) > g
    assert children(t.pid) == kids and fd_state(t.pid) == fds
    assert t.proc.poll() is None


SPARSE_SHARED = """
import mmap, sys, time
m = mmap.mmap(-1, 64 << 20)  # MAP_SHARED anonymous: shmem, one page of it touched
m[4096:4101] = b"hello"
print("READY", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("kind", ["copy-on-write", "captured"])
def test_a_sparse_shared_mapping_is_not_filled_by_the_snapshot(tmp_path, kind):
    """The snapshot reads MAP_SHARED memory in the window. Reading a hole of shmem
    through /proc/PID/mem allocates it in the target: only the pages holding data
    may be read (failed before the fix: RssShmem went from 8 kB to 64 MiB)."""
    proc = subprocess.Popen([sys.executable, "-c", SPARSE_SHARED], stdout=subprocess.PIPE)
    try:
        assert proc.stdout and proc.stdout.readline().strip() == b"READY"
        before = proc_status(proc.pid)["RssShmem"]
        parent = None
        if kind == "captured":  # a parent, and nothing written since: nothing to copy
            pre_dump(DumpRequest(proc.pid, tmp_path / "p", progress=False))
            parent = "../p"
        res = dump(
            DumpRequest(
                proc.pid, tmp_path / "d", thaw=Thaw.RUNNING, prev_images_dir=parent, progress=False
            )
        )
        assert res.stats["snapshot"] == kind
        assert proc_status(proc.pid)["RssShmem"] == before
        dumped = Dump.open(tmp_path / "d")
        vmas = dumped.mm(proc.pid).vmas
        addr = next(v["start"] for v in vmas if v["end"] - v["start"] == 64 << 20)
        assert dumped.read_memory(proc.pid, addr + 4096, 5) == b"hello"
        assert dumped.read_memory(proc.pid, addr + (32 << 20), 4096) == bytes(4096)
    finally:
        proc.kill()
        proc.wait()


DONTFORK_RESERVATION = """
import mmap, time
MAP_NORESERVE = 0x4000
# As V8 does: a big address-space reservation, PROT_NONE and MADV_DONTFORK, of
# which little is ever used; and 32 MiB of ordinary memory.
reservation = mmap.mmap(
    -1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, prot=0
)
reservation.madvise(mmap.MADV_DONTFORK)
data = bytearray(32 << 20)
for page in range(0, len(data), 4096):
    data[page] = 1
print("READY", flush=True)
time.sleep(600)
"""


def test_an_empty_dontfork_reservation_does_not_prevent_the_snapshot(tmp_path):
    """What a child does not get (MADV_DONTFORK) is read in the window and held; over
    PREFETCH_LIMIT there is no snapshot. The limit counted the size of such VMAs,
    not their pages: Node.js holds ~1.5 GiB of DONTFORK reservations with ~10 MiB
    in them, so its leave-running dumps were copied frozen (failed before the fix:
    "snapshot" was "none")."""
    proc = subprocess.Popen([sys.executable, "-c", DONTFORK_RESERVATION], stdout=subprocess.PIPE)
    try:
        assert proc.stdout and proc.stdout.readline().strip() == b"READY"
        res = dump(DumpRequest(proc.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False))
        assert res.stats["snapshot"] == "copy-on-write"
        assert verify_dump(str(tmp_path / "d"))["pages"] >= (32 << 20) // PAGE
    finally:
        proc.kill()
        proc.wait()


THRICE_MAPPED = """
import mmap, os, time
# As the JVM's ZGC does: one memfd heap mapped at three addresses.
fd = os.memfd_create("heap")
os.ftruncate(fd, 100 << 20)
views = [mmap.mmap(fd, 100 << 20) for _ in range(3)]
for page in range(0, 8 << 20, 4096):
    views[0][page] = 1
print("READY", flush=True)
time.sleep(600)
"""


def test_shared_memory_mapped_thrice_counts_once_toward_the_limit(tmp_path):
    """Shared memory is read in the window and held, once per object (as the copy
    plans it): a 100 MiB memfd mapped three times is 100 MiB to hold, under
    PREFETCH_LIMIT. The limit added up its mappings (300 MiB), so a ZGC JVM's
    leave-running dumps were copied frozen (failed before the fix: "snapshot"
    was "none")."""
    proc = subprocess.Popen([sys.executable, "-c", THRICE_MAPPED], stdout=subprocess.PIPE)
    try:
        assert proc.stdout and proc.stdout.readline().strip() == b"READY"
        res = dump(DumpRequest(proc.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False))
        assert res.stats["snapshot"] == "copy-on-write"
    finally:
        proc.kill()
        proc.wait()


FILLING_SHARED = """
import mmap, time
print("READY", flush=True)
old = None
while True:
    m = mmap.mmap(-1, 16 << 20)  # MAP_SHARED anonymous: shmem, filled page by page
    if old is not None:
        old.close()  # (after the next is mapped: a dump always finds one)
    for page in range(0, 16 << 20, 4096):
        m[page] = 1
        if page % (8 << 12) == 0:
            time.sleep(0.0002)
    old = m
"""


def test_shared_memory_filled_after_the_thaw_is_copied_as_it_was(tmp_path):
    """Shared memory is read in the window, where only its pages holding data are
    read; the copy after the thaw planned the shared objects again, from the
    running target. A page populated in between was in the new plan and not in
    what was read: "could not read memory" failed the dump (failed before the fix,
    3 of 3 runs)."""
    proc = subprocess.Popen([sys.executable, "-c", FILLING_SHARED], stdout=subprocess.PIPE)
    try:
        assert proc.stdout and proc.stdout.readline().strip() == b"READY"
        for i in range(6):
            req = DumpRequest(proc.pid, tmp_path / str(i), thaw=Thaw.RUNNING, progress=False)
            assert dump(req).stats["snapshot"] != "none"
            dumped = Dump.open(tmp_path / str(i))
            regions = [v for v in dumped.mm(proc.pid).vmas if v["end"] - v["start"] == 16 << 20]
            assert regions
            for region in regions:
                data = dumped.read_memory(proc.pid, region["start"], 16 << 20)
                # Filled in order: at the freeze, pages 0..k-1 held 1, the rest nothing.
                assert set(data[::4096].rstrip(b"\0")) <= {1}
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_few_pages_to_copy_are_captured_in_the_window(tmp_path, monkeypatch):
    """A leave-running dump with few pages to copy (a converged chain's final dump)
    reads them into memory in the window, and compresses and writes them after the
    thaw: no copy-on-write children, and the dump holds the bytes of the instant,
    not those the target writes once it runs again."""
    from checkpointer import memdump

    t = start_target("--anon-mb", "64")
    try:
        anon, _ = t.regions["anon"]
        pre_dump(DumpRequest(t.pid, tmp_path / "p", progress=False))
        t.command("write 0 8")
        at_the_freeze = t.read_mem(anon, 8 * PAGE)
        kids = children(t.pid)
        copy = memdump.copy_memory

        def write_again_then_copy(*args, **kwargs):
            assert tracer(t.pid) == 0  # thawed: the copy comes after the window
            t.command("write 0 8")  # the live pages change again
            return copy(*args, **kwargs)

        monkeypatch.setattr(memdump, "copy_memory", write_again_then_copy)
        res = dump(
            DumpRequest(
                t.pid, tmp_path / "d", thaw=Thaw.RUNNING, prev_images_dir="../p", progress=False
            )
        )
        assert res.stats["snapshot"] == "captured" and res.incremental
        assert t.read_mem(anon, 8 * PAGE) != at_the_freeze
        assert Dump.open(tmp_path / "d").read_memory(t.pid, anon, 8 * PAGE) == at_the_freeze
        assert verify_dump(str(tmp_path / "d"))["pages"] > 0
        assert children(t.pid) == kids and t.proc.poll() is None
    finally:
        t.kill()


def test_snapshot_dump_on_a_content_compared_parent(writer, tmp_path):
    t = writer()
    res = pre_dump(DumpRequest(t.pid, tmp_path / "p", tracker="full", progress=False))
    # The full tracker needs no freeze: no snapshot, and none needed.
    assert res.stats["snapshot"] == "none"
    res = dump(DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, prev_images_dir="../p"))
    assert res.stats["snapshot"] == "copy-on-write"
    assert_one_instant(Dump.open(tmp_path / "d"), t)


@pytest.mark.uffd_wp
def test_snapshot_incremental_dump_keeps_tracking(writer, tmp_path):
    t = writer()
    pre_dump(DumpRequest(t.pid, tmp_path / "p", tracker="uffd-wp", progress=False))
    res = dump(
        DumpRequest(
            t.pid, tmp_path / "d", thaw=Thaw.RUNNING, prev_images_dir="../p", tracker="uffd-wp"
        )
    )
    assert res.incremental and res.stats["snapshot"] == "copy-on-write"
    assert_one_instant(Dump.open(tmp_path / "d"), t)
    # Tracking stayed with the original: the next pass is still incremental.
    res = dump(
        DumpRequest(
            t.pid, tmp_path / "e", thaw=Thaw.RUNNING, prev_images_dir="../d", tracker="uffd-wp"
        )
    )
    assert res.incremental
    assert_one_instant(Dump.open(tmp_path / "e"), t)


def test_without_snapshot_the_copy_is_frozen(writer, tmp_path):
    t = writer()
    res = dump(
        DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False, snapshot=False)
    )
    assert res.stats["snapshot"] == "none"
    assert_one_instant(Dump.open(tmp_path / "d"), t)


def pids_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/pids")
    return root if (root / "cgroup.procs").exists() and os.access(root, os.W_OK) else None


def test_clone_refused_falls_back_to_a_frozen_copy(writer, tmp_path, caplog):
    root = pids_cgroup()
    if root is None:
        pytest.skip("needs a writable cgroup v1 pids hierarchy")
    t = writer()
    group = root / f"checkpointer-test-{os.getpid()}-{t.pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(t.pid))
        (group / "pids.max").write_text("1")  # the target itself: no room for a clone
        res = dump(DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False))
        assert res.stats["snapshot"] == "none"
        assert "no copy-on-write snapshot" in caplog.text
        assert_one_instant(Dump.open(tmp_path / "d"), t)
        assert children(t.pid) == set()
    finally:
        (root / "cgroup.procs").write_text(str(t.pid))
        group.rmdir()


def test_tool_killed_during_the_copy_leaves_no_process(writer, tmp_path):
    t = writer(mb=512)
    kids = children(t.pid)
    tool = subprocess.Popen(
        [*CLI, "dump", "-t", str(t.pid), "-D", str(tmp_path / "d"), "--leave-running"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The copy: a child exists and the target runs again (not traced). (A tool
    # killed inside the window, while a syscall is being injected, would leave the
    # target with injected registers: that hazard is every injection's, not the
    # snapshot's.)
    snapshot_child = None
    deadline = time.monotonic() + 60
    while tool.poll() is None and time.monotonic() < deadline:
        snapshot_child = next(iter(children(t.pid) - kids), None)
        if snapshot_child and tracer(t.pid) == 0 and tracer(snapshot_child) == tool.pid:
            break
        time.sleep(0.001)
    assert snapshot_child is not None, "the copy-on-write child never appeared"
    os.kill(tool.pid, signal.SIGKILL)
    tool.wait()
    # The watchdog reaps the child through the target (an injected wait4): the
    # target is traced until it has detached, a moment after the child is gone.
    deadline = time.monotonic() + 10
    while (children(t.pid) != kids or tracer(t.pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert children(t.pid) == kids
    assert not is_child_of(snapshot_child, t.pid)
    assert t.proc.poll() is None
    assert tracer(t.pid) == 0


MADV_DONTDUMP, MADV_WIPEONFORK = 16, 18
NR_madvise, NR_mlock = 28, 149


def vma_around(pid: int, addr: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return lo, hi
    raise AssertionError(f"{addr:#x} is not mapped in {pid}")


def madvise_after_the_early_read(
    monkeypatch, pid: int, addr: int, advice: int, nr: int = NR_madvise
) -> tuple:
    """Have the target madvise (or mlock: `nr`) the whole VMA at addr (its maps line
    stays the same, only its smaps VmFlags change) right after the dump read its
    maps before the freeze."""
    from checkpointer import dump as dump_module
    from checkpointer.freezer import stopped_thread
    from checkpointer.kernel.inject import SyscallSession

    lo, hi = vma_around(pid, addr)
    early = dump_module._vmas_or_none
    calls = []

    def early_then_madvise(p):
        found = early(p)
        if not calls:
            with stopped_thread(pid) as tid, SyscallSession(tid) as s:
                s.call(nr, lo, hi - lo, *((advice,) if nr == NR_madvise else ()))
        calls.append(p)
        return found

    monkeypatch.setattr(dump_module, "_vmas_or_none", early_then_madvise)
    return lo, hi


def vmflags_at(dumped: Dump, pid: int, start: int) -> list[str]:
    return next(v["vmflags"] for v in dumped.mm(pid).vmas if v["start"] == start)


def test_wipeonfork_set_before_the_freeze_is_seen(writer, tmp_path, monkeypatch, caplog):
    """A VMA made WIPEONFORK between the early maps read and the freeze is zero in the
    copy-on-write child: the dump must notice and hold it from the original."""
    t = writer()
    lo, _ = madvise_after_the_early_read(
        monkeypatch, t.pid, t.regions["private"][0], MADV_WIPEONFORK
    )
    res = dump(DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False))
    assert res.stats["snapshot"] == "copy-on-write"
    dumped = Dump.open(tmp_path / "d")
    assert_one_instant(dumped, t)
    assert "wf" in vmflags_at(dumped, t.pid, lo)
    assert "changed" in caplog.text


def test_vmflags_changed_before_the_freeze_are_recorded(writer, tmp_path, monkeypatch):
    """The same for a frozen copy (no snapshot): the records hold the flags of the
    instant, not those read before the freeze."""
    t = writer()
    lo, _ = madvise_after_the_early_read(monkeypatch, t.pid, t.regions["private"][0], MADV_DONTDUMP)
    dump(DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False, snapshot=False))
    dumped = Dump.open(tmp_path / "d")
    assert_one_instant(dumped, t)
    assert "dd" in vmflags_at(dumped, t.pid, lo)


def test_watchdog_says_when_it_runs():
    """The dump waits for its watchdog's "ready" before freezing, so the watchdog's
    start-up does not share the CPU with the frozen window."""
    from checkpointer.snapshot import Watchdog

    watchdog = Watchdog()
    try:
        assert watchdog.wait_ready(timeout=30)
        assert watchdog._proc is not None and watchdog._proc.poll() is None
    finally:
        proc = watchdog._proc
        watchdog.close()
    assert proc is not None and proc.wait(timeout=30) == 0


def test_vmflags_check_rules():
    """What the check of early flags counts as a change: not a merge with a neighbour
    of the same flags (uffd-wp registration in the window), not tracking flags, not
    what a fork drops; a flag set, or a VMA gone, is one."""
    from checkpointer.collect import vmflags_changed
    from checkpointer.vmas import Vma

    def vma(start, end, *flags):
        return Vma(start, end, "rw-p", 0, "00:00", 0, "", flags)

    rw = ("rd", "wr", "mr", "mw", "me", "ac")
    ours = [vma(0x1000, 0x3000, *rw), vma(0x3000, 0x4000, *rw), vma(0x5000, 0x6000, *rw, "dc")]
    merged = [(0x1000, 0x4000, [*rw, "uw"]), (0x5000, 0x6000, [*rw, "dc", "sd"])]
    assert vmflags_changed(ours, merged) == []
    locked = [vma(0x1000, 0x2000, *rw, "lo"), vma(0x5000, 0x6000, *rw, "dc")]
    child = [(0x1000, 0x2000, list(rw))]  # a fork: no lock flags, no DONTFORK VMA
    assert vmflags_changed(locked, child, forked=True) == []
    assert vmflags_changed(locked, child) == [(locked[0], list(rw)), (locked[1], None)]
    wiped = [(0x1000, 0x4000, [*rw, "wf"]), (0x5000, 0x6000, [*rw, "dc"])]
    assert [v.start for v, _ in vmflags_changed(ours, wiped)] == [0x1000, 0x3000]
    assert [v.start for v, _ in vmflags_changed(ours, [(0x1000, 0x4000, list(rw))])] == [0x5000]


def test_mlock_before_the_freeze_is_recorded(writer, tmp_path, monkeypatch, caplog):
    """A snapshot's children show no lock flags: an mlock between the early read and
    the freeze is seen by the locked size, and the flags are read in the window."""
    t = writer()
    lo, _ = madvise_after_the_early_read(monkeypatch, t.pid, t.regions["private"][0], 0, NR_mlock)
    res = dump(DumpRequest(t.pid, tmp_path / "d", thaw=Thaw.RUNNING, progress=False))
    assert res.stats["snapshot"] == "copy-on-write"
    dumped = Dump.open(tmp_path / "d")
    assert_one_instant(dumped, t)
    assert "lo" in vmflags_at(dumped, t.pid, lo)
    assert "dumping again" not in caplog.text  # seen in the window: no second pass


FORKING_BIG = """
import os, time
heap = bytearray(os.urandom(1 << 20)) * 48  # 48 MiB: each child's RssAnon
print("READY", flush=True)
while True:
    child = os.fork()
    if child == 0:
        heap[0:4096] = bytes(4096)
        time.sleep(0.02)
        os._exit(0)
    os.waitpid(child, 0)
"""


def test_a_big_child_exiting_right_after_the_thaw_leaves_its_snapshot(tmp_path):
    """A child too big to read in the window gets a copy-on-write child; one that
    exits right after the thaw (a forking server's short-lived worker) took its
    snapshot with it (PR_SET_PDEATHSIG), and the dump failed: "exited right
    after the freeze, and its copy-on-write snapshot with it" (about 1 dump in 3).
    The snapshot now holds no file of its parent and outlives it."""
    root = subprocess.Popen([sys.executable, "-c", FORKING_BIG], stdout=subprocess.PIPE)
    try:
        assert root.stdout and root.stdout.readline().strip() == b"READY"
        trees = 0
        for i in range(10):
            req = DumpRequest(root.pid, tmp_path / str(i), thaw=Thaw.RUNNING, progress=False)
            res = dump(req)
            assert res.stats["snapshot"] == "copy-on-write"
            trees += len(res.pids) > 1
            assert verify_dump(str(tmp_path / str(i)))["pages"] > 0
        assert trees >= 5, "the dumps rarely caught a child: the test shows nothing"
        assert root.poll() is None
        kids = subprocess.run(["ps", "--ppid", str(root.pid), "-o", "pid="],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
        assert len(kids) <= 1  # its worker of the moment, none of ours
    finally:
        root.kill()
        root.wait()


def test_a_tree_whose_children_come_and_go_dumps_every_time(tmp_path):
    """A shell running short commands in a loop: the child of the instant often
    exits right after the thaw, and its copy-on-write child dies with it
    (PR_SET_PDEATHSIG). Half of such dumps failed with "process N does not exist"
    (N: the snapshot child). Small processes are now read in the window."""
    loop = subprocess.Popen(["bash", "-c", "while :; do /bin/true; done"],
                            stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.2)
        for i in range(12):
            req = DumpRequest(pid=loop.pid, images_dir=tmp_path / str(i), thaw=Thaw.RUNNING,
                              progress=False)  # fmt: skip
            res = dump(req)
            assert res.stats["snapshot"] == "copy-on-write"
            assert res.pids[0] == loop.pid
            assert verify_dump(str(tmp_path / str(i)))["pages"] > 0
        assert loop.poll() is None  # it ran on
        # No trace in the shell: no child of ours left behind.
        kids = subprocess.run(["ps", "--ppid", str(loop.pid), "-o", "comm="],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
        assert set(kids) <= {"true"}
    finally:
        loop.kill()
        loop.wait()


MEMFD_GENERATIONS = """
import ctypes, mmap, os, struct, time
private = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)  # over 4 MiB: a snapshot
private[::4096] = b"\\1" * (8 << 8)
fd = os.memfd_create("generations")
os.ftruncate(fd, 1 << 20)
shared = mmap.mmap(fd, 1 << 20)
print(ctypes.addressof(ctypes.c_char.from_buffer(private)),
      ctypes.addressof(ctypes.c_char.from_buffer(shared)), flush=True)
generation = 0
while True:  # every memfd page holds generation + 1 before the private copy says so
    stamp = struct.pack("q", generation + 1)
    for page in range(0, 1 << 20, 4096):
        shared[page : page + 8] = stamp
    private[0:8] = stamp
    generation += 1
    time.sleep(0.0001)
"""


def test_a_memfd_is_read_as_it_was_at_the_freeze(tmp_path):
    """A memfd is stored whole (contents.py), read through the original's fd: with a
    snapshot it was read after the thaw, generations ahead of the private memory
    dumped at the freeze (failed before the fix: the memfd's pages held a later
    generation than the private counter). Found by a sweep."""
    proc = subprocess.Popen([sys.executable, "-c", MEMFD_GENERATIONS], stdout=subprocess.PIPE)
    try:
        assert proc.stdout
        private, shared = map(int, proc.stdout.readline().split())
        time.sleep(0.3)
        for i in range(3):
            req = DumpRequest(proc.pid, tmp_path / str(i), thaw=Thaw.RUNNING, progress=False)
            assert dump(req).stats["snapshot"] != "none"
            dumped = Dump.open(tmp_path / str(i))
            (generation,) = struct.unpack("q", dumped.read_memory(proc.pid, private, 8))
            data = dumped.read_memory(proc.pid, shared, 1 << 20)
            stamps = {struct.unpack("q", data[p : p + 8])[0] for p in range(0, 1 << 20, 4096)}
            # Frozen mid-round: the memfd holds this generation, or the next in part.
            assert stamps <= {generation, generation + 1}, (generation, sorted(stamps)[-3:])
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def rwx_shared_maps(pid: int) -> list[str]:
    """The target's shared, executable anonymous mappings: what an injected code
    page looks like (the generations target has none of its own)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [line for line in maps if line.split()[1] == "rwxs"]


@pytest.mark.parametrize(
    "where, sig",
    [
        ("clone", signal.SIGINT),
        ("clone", signal.SIGTERM),
        ("munmap", signal.SIGTERM),
        ("spawned", signal.SIGINT),
    ],
)
def test_interrupt_while_the_child_is_cloned_leaves_no_trace(
    writer, tmp_path, monkeypatch, where, sig
):
    """A SIGINT or SIGTERM to a --leave-running dump, landing just after the injected
    clone returned ("clone"), while the code page was being unmapped ("munmap"), or
    just after cowchild.spawn returned ("spawned"), left the child a zombie (or
    stopped) under the target, and in the second case its code page still mapped
    (failed before the fix: children_of_target had the clone; "munmap" said
    "injected syscall 11 did not complete", not "terminated"). The signal is real,
    sent by the tool to itself at that point; the dump runs in this process through
    its CLI, whose handlers are the tool's."""
    from click.testing import CliRunner

    from checkpointer import interrupt
    from checkpointer.cli import main
    from checkpointer.kernel import cowchild, ptrace

    t = writer()
    kids = children(t.pid)
    maps = rwx_shared_maps(t.pid)
    cloned = []

    def signal_self() -> None:
        os.kill(os.getpid(), sig)

    if where == "spawned":
        spawn = cowchild.spawn

        def spawn_then_signal(*args):
            child = spawn(*args)
            cloned.append(child.pid)
            signal_self()
            return child

        monkeypatch.setattr(cowchild, "spawn", spawn_then_signal)
    else:
        clone = cowchild._clone

        def clone_then_signal(*args):
            cloned.append(clone(*args))
            if where == "clone":
                signal_self()
            return cloned[-1]

        monkeypatch.setattr(cowchild, "_clone", clone_then_signal)
        resume = ptrace.resume_to_syscall

        def resume_and_signal(tid, *args):
            resume(tid, *args)
            if where == "munmap" and len(cloned) == 1:  # the first call after the clone
                cloned.append(0)
                signal_self()  # lands while the syscall runs

        monkeypatch.setattr(ptrace, "resume_to_syscall", resume_and_signal)
    try:
        args = ["dump", "-t", str(t.pid), "-D", str(tmp_path / "d"), "--leave-running"]
        r = CliRunner().invoke(main, args, catch_exceptions=False)
        assert cloned, "the signal was never sent"
        assert r.exit_code == 1
        what = "interrupted" if sig == signal.SIGINT else "terminated"
        assert r.stderr.splitlines() == [
            f"checkpointer: {what}; nothing was left stopped or half-written"
        ]
        assert children(t.pid) == kids
        assert rwx_shared_maps(t.pid) == maps
        assert tracer(t.pid) == 0 and t.proc.poll() is None
        assert not (tmp_path / "d").exists()
    finally:
        interrupt.clear()  # what the CLI's handlers recorded, not to end a later test
        for pid in children(t.pid) - kids:
            os.kill(pid, signal.SIGKILL)
