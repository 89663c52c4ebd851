"""A forked tree's copy-on-write sharing: dumped once, and kept by restore.

A server that forks workers (gunicorn, redis's BGSAVE child, a prefork
daemon) shares its memory with them until either side writes. Each process is
dumped whole, so a restore that rebuilt each from its own pages would give every
worker a private copy: a tree of 4 sharing 100 MB would need 400 MB after
restore. As CRIU does, a child inherits its parent's restored private memory and
gets only the pages that differ written again; pages its parent has and it had
not are dropped. A dump that reads the tree frozen stores the pages a child maps
to its parent's page frames once, as the parent's ("same" runs).
"""

from __future__ import annotations

import os
import signal

from memcheck import compare_dump_with_process
from objectslib import dump_and_kill, program_starter, sigkill
from restorelib import wait_stopped
from targetlib import cli

from checkpointer.images import Dump

MIB = 1 << 20

# A parent with 48 MiB of random data in the heap and 8 MiB in an anonymous
# mapping forks three children: one writes a page of each, one changes nothing,
# one drops half of the mapping (MADV_DONTNEED) and maps memory of its own; a
# fourth runs another program (sleep).
FORKING_PROGRAM = """
    import mmap
    heap = bytearray(os.urandom(48 << 20))
    area = mmap.mmap(-1, 8 << 20)
    area.write(os.urandom(8 << 20))
    kids = []
    for n in range(3):
        pid = os.fork()
        if pid == 0:
            own = None
            if n == 0:
                heap[4096:8192] = b"k" * 4096
                area[0:4096] = b"k" * 4096
            elif n == 2:
                area.madvise(mmap.MADV_DONTNEED, 0, 4 << 20)
                own = mmap.mmap(-1, 1 << 20)
                own.write(b"o" * (1 << 20))
            r, w = os.pipe()
            os.read(r, 1)  # until killed
            os._exit(0)
        kids.append(pid)
    import subprocess
    kids.append(subprocess.Popen(["sleep", "1000"]).pid)  # exec'd: shares nothing
    report("kids", " ".join(map(str, kids)).encode())
    ready()
    go()
    report("alive", 1)
    go_on = D / "go-on"
    while not go_on.exists():
        time.sleep(0.05)
"""


def carries_on(prog, tree: list[int]) -> None:
    """The stopped tree resumes and the parent answers."""
    for pid in tree:
        os.kill(pid, signal.SIGCONT)
    prog.go()
    assert prog.result("alive") == b"1"


def pss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Pss for {pid}")


def vmflags(pid: int) -> dict[int, list[str]]:
    """start address -> VmFlags of each mapping."""
    out, start = {}, None
    for line in open(f"/proc/{pid}/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            start = int(line.split("-")[0], 16)
        elif line.startswith("VmFlags:"):
            out[start] = line.split(":", 1)[1].split()
    return out


def private_kib(pid: int) -> int:
    total = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def test_a_forked_tree_keeps_sharing_its_memory_after_restore(tmp_path):
    with program_starter(tmp_path) as start:
        prog = start(FORKING_PROGRAM)
        parent = prog.pid
        kids = [int(k) for k in prog.result("kids").split()]
        tree = [parent, *kids]
        try:
            pss_before = sum(pss_kib(p) for p in tree)
            images = tmp_path / "images"
            dump_and_kill(parent, images, reap=prog.reap)
            # (its shared pages are the parent's in the images: restored from those)
            assert Dump.open(images).pagemap(f"pid-{kids[1]}").head.get("pages_same", 0) > 0
            r = cli("restore", "-D", str(images), "-d", "--leave-stopped")
            assert r.returncode == 0, r.stderr
            for pid in tree:
                wait_stopped(pid)
                compare_dump_with_process(images, pid)  # every page as dumped
            pss_after = sum(pss_kib(p) for p in tree)
            # Before the fix each child held its own copy: 56 MiB more each.
            assert pss_after < pss_before * 1.25 + 8 * 1024, (pss_before, pss_after)
            # The child that changed nothing shares all but a few MiB of it.
            assert private_kib(kids[1]) < 16 * 1024, private_kib(kids[1])
            # The parent's mappings were marked MADV_DONTFORK while the exec'd child
            # was cloned (it keeps none of them), and are not any more.
            dumped = {v["start"]: v["vmflags"] for v in Dump.open(images).mm(parent).vmas}
            now = vmflags(parent)  # (adjacent mappings alike may have merged)
            both = sorted(set(now) & set(dumped))
            assert len(both) > 10
            assert [s for s in both if "dc" in now[s]] == [s for s in both if "dc" in dumped[s]]
            carries_on(prog, tree)
        finally:
            sigkill(*kids)


def test_a_forked_childs_shared_pages_are_dumped_once(tmp_path):
    """Dumped with the tree frozen (--leave-stopped), each child's pages that are
    still its parent's page frames are recorded as the parent's, not copied again,
    and every process's memory reads back from the images as it is."""
    with program_starter(tmp_path) as start:
        prog = start(FORKING_PROGRAM)
        parent = prog.pid
        kids = [int(k) for k in prog.result("kids").split()]
        tree = [parent, *kids]
        images = tmp_path / "images"
        try:
            r = cli("dump", "-t", str(parent), "-D", str(images), "--leave-stopped")
            assert r.returncode == 0, r.stderr
            for pid in tree:
                wait_stopped(pid)
                compare_dump_with_process(images, pid)
            dump = Dump.open(images)
            same = {pid: (dump.pagemap(f"pid-{pid}").head.get("pages_same", 0)) for pid in tree}
            # The idle forked child: its 48 + 8 MiB are its parent's, and so is most
            # of the others'; the exec'd child (sleep) shares nothing.
            assert same[kids[1]] * 4096 > 50 * MIB, same
            assert same[kids[0]] * 4096 > 50 * MIB and same[kids[2]] * 4096 > 48 * MIB, same
            assert same[parent] == 0 and same[kids[3]] == 0, same
            assert f"as the parent process's {sum(same.values())}" in r.stdout
            held = sum(os.path.getsize(images / f"pages-pid-{k}") for k in kids[:3])
            assert held < 8 * MIB, held  # not 3 x 56 MiB of random bytes
            carries_on(prog, tree)
        finally:
            sigkill(*kids)
