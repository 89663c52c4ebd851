"""restore refuses what cannot work, with one line, before anything is created;
and whatever goes wrong later, no half-restored process survives."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from restorelib import start_lifecycle
from targetlib import assert_one_line_error, cli, proc_status

from checkpointer.images import format as fmt


@pytest.fixture
def dumped(tmp_path):
    """A lifecycle workload dumped (and killed); yields (workload, images dir)."""
    lc = start_lifecycle(tmp_path)
    images = tmp_path / "images"
    r = cli("dump", "-t", str(lc.pid), "-D", str(images))
    assert r.returncode == 0, r.stderr
    lc.reap_original()
    yield lc, images
    lc.kill()


def assert_nothing_restored(lc, timeout: float = 5.0) -> None:
    """Neither process of the dump exists (a killed one may take a moment to go)."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in (lc.pid, lc.child)):
        assert time.monotonic() < deadline, "a restored process survived the failure"
        time.sleep(0.02)


def rewrite_records(path, change) -> None:
    """Decode a record file, change its records, write it back (same format)."""
    records = fmt.read_records(str(path))
    change(records)
    kind = fmt.kind_of_name(path.name)
    data = fmt.encode_records(kind, records)
    version = fmt.read_header(str(path))[1]
    path.write_bytes(data[:8] + version.to_bytes(2, "little") + data[10:])


def test_pid_taken_is_refused_and_the_original_keeps_running(tmp_path):
    lc = start_lifecycle(tmp_path)
    try:
        r = cli("dump", "-t", str(lc.pid), "-D", str(tmp_path / "i"), "--leave-running")
        assert r.returncode == 0, r.stderr
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert_one_line_error(r, f"PID {lc.pid} is taken")
        lc.carries_on()
    finally:
        lc.kill()


@pytest.mark.damages_images
def test_incomplete_chain_is_refused_before_anything_is_created(tmp_path):
    lc = start_lifecycle(tmp_path)
    try:
        assert cli("pre-dump", "-t", str(lc.pid), "-D", str(tmp_path / "1")).returncode == 0
        r = cli("dump", "-t", str(lc.pid), "-D", str(tmp_path / "2"), "--prev-images-dir", "../1",
                "--track-mem")  # fmt: skip
        assert r.returncode == 0, r.stderr
        lc.reap_original()
        (tmp_path / "1" / "inventory").unlink()  # the parent is now an interrupted dump
        assert_one_line_error(cli("restore", "-D", str(tmp_path / "2"), "-d"), "incomplete")
        assert_nothing_restored(lc)
    finally:
        lc.kill()


@pytest.mark.damages_images
def test_corrupt_pagemap_is_refused_before_anything_is_created(dumped):
    lc, images = dumped
    pagemap = images / f"pagemap-pid-{lc.pid}"
    data = bytearray(pagemap.read_bytes())
    data[40] ^= 0xFF
    pagemap.write_bytes(bytes(data))
    assert_one_line_error(cli("restore", "-D", str(images), "-d"), "pagemap")
    assert_nothing_restored(lc)


@pytest.mark.damages_images
def test_corrupt_page_data_rolls_back(dumped):
    """A frame whose checksum fails is found while writing pages: everything
    created so far is killed, and the error is one line."""
    lc, images = dumped
    pages = images / f"pages-pid-{lc.pid}"
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))
    assert_one_line_error(cli("restore", "-D", str(images), "-d"), "corrupt")
    assert_nothing_restored(lc)


@pytest.mark.damages_images
@pytest.mark.parametrize("name", ["inventory", "pstree", "core-{pid}", "pages-pid-{pid}"])
@pytest.mark.parametrize("put", ["fifo", "symlink"])
def test_a_fifo_or_symlink_in_place_of_an_image_file_is_refused(dumped, name, put):
    """An image file is read as a regular file of the dump's own directory: a FIFO
    there hung restore (and verify, show, info) forever, waiting for a writer; a
    symbolic link was followed by restore (wherever it led) while verify refused it."""
    lc, images = dumped
    path = images / name.format(pid=lc.pid)
    if put == "fifo":
        path.unlink()
        os.mkfifo(path)
        words = "not a regular file"
    else:
        path.rename(images.parent / "elsewhere")
        path.symlink_to(images.parent / "elsewhere")
        words = "symbolic link"
    assert_one_line_error(cli("restore", "-D", str(images), "-d", timeout=30), path.name, words)
    assert_nothing_restored(lc)
    commands = [["verify", str(images)], ["info", str(path)]]
    if not name.startswith("pages"):  # (show reads what the pagemaps say of them)
        commands.append(["show", str(images)])
    for command in commands:
        assert_one_line_error(cli(*command, timeout=30), path.name)


@pytest.mark.damages_images
def test_a_final_dump_missing_a_shared_objects_pages_is_refused(dumped):
    """A final dump holds a page map for every memory object its processes use (a
    MAP_SHARED region, a memfd, a deleted file), empty or not. Without one, verify
    said OK and restore gave the shared memory zeros."""
    lc, images = dumped
    shared = sorted(images.glob("pagemap-shm-*"))
    assert shared, "the workload maps shared memory"
    for path in (shared[0], images / shared[0].name.replace("pagemap-", "pages-", 1)):
        path.unlink()
    assert_one_line_error(cli("verify", str(images)), shared[0].name, "missing")
    assert_one_line_error(cli("restore", "-D", str(images), "-d"), shared[0].name, "missing")
    assert_nothing_restored(lc)


def test_changed_file_behind_a_mapping_is_refused(dumped):
    lc, images = dumped
    mapped = lc.dir / "mapped"
    mapped.write_bytes(b"another file" + mapped.read_bytes()[12:])
    os.utime(mapped, ns=(0, 0))
    r = cli("restore", "-D", str(images), "-d")
    assert_one_line_error(r, str(mapped), "changed since the dump")
    assert_nothing_restored(lc)


def test_missing_file_behind_an_fd_is_refused(dumped):
    lc, images = dumped
    (lc.dir / "log").unlink()
    assert_one_line_error(cli("restore", "-D", str(images), "-d"), "log")
    assert_nothing_restored(lc)


def test_vdso_of_another_size_is_refused(dumped):
    lc, images = dumped

    def grow_vdso(records):
        for rec in records[1:]:
            if rec["path"] == "[vvar]":
                rec["end"] -= 0x1000  # a smaller [vvar]: another kernel's layout

    rewrite_records(images / f"mm-{lc.pid}", grow_vdso)
    assert_one_line_error(cli("restore", "-D", str(images), "-d"), "vdso", "same kernel")
    assert_nothing_restored(lc)


def test_xstate_of_another_cpu_is_refused(dumped):
    lc, images = dumped

    def other_cpu(records):
        for rec in records[1:]:
            blob = bytearray(rec["xstate"])
            blob[472] ^= 0x04  # xfeatures: flip the AVX bit
            rec["xstate"] = bytes(blob)

    rewrite_records(images / f"core-{lc.pid}", other_cpu)
    assert_one_line_error(cli("restore", "-D", str(images), "-d"), "other features")
    assert_nothing_restored(lc)


def test_no_privilege_is_refused(dumped):
    lc, images = dumped
    # Root without its capabilities, as in a container that was not given them.
    r = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m",
         "checkpointer", "restore", "-D", str(images), "-d"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_line_error(r, "needs root", "CAP_SYS_ADMIN")
    assert_nothing_restored(lc)


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.5])
def test_sigkill_of_the_restorer_leaves_nothing(dumped, delay):
    lc, images = dumped
    at_dump = lc.status()["counter"]
    p = subprocess.Popen(
        [sys.executable, "-m", "checkpointer", "restore", "-D", str(images), "-d"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # The restorer's death sends its tracees SIGKILL, but they die when next
    # scheduled: on a loaded machine, a while after its wait returns. Wait until
    # the root is gone, or runs: it finished before the kill, and then it must be
    # whole and running.
    deadline = time.monotonic() + 10
    while _alive(lc.pid):
        if lc.status()["counter"] > at_dump:
            lc.carries_on()
            return
        assert time.monotonic() < deadline, f"process {lc.pid} neither runs nor dies"
        time.sleep(0.01)
    assert_nothing_restored(lc)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


# A subreaper standing in for a slow init: it starts a session leader that forks a
# child on SIGUSR1, reaps the leader as soon as it dies, and the orphaned child only
# after `delay` seconds (or when killed itself).
HOLDER = r"""
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
LEADER = '''
import os, signal, time
def fork_child(*_):
    if os.fork() == 0:
        time.sleep(1000)
        os._exit(0)
signal.signal(signal.SIGUSR1, fork_child)
while True:
    time.sleep(0.05)
'''
leader = os.fork()
if leader == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", LEADER])
print(leader, flush=True)
os.waitpid(leader, 0)
print("reaped", flush=True)
time.sleep(float(sys.argv[1]))
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def _holder_with_an_orphan(tmp_path, delay: float):
    """(holder, leader pid, orphan pid): the leader dumped with --leave-running, then
    killed with the child it forked after the dump, which the holder has not reaped."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(delay)], stdout=subprocess.PIPE, text=True
    )
    leader = int(holder.stdout.readline())
    deadline = time.monotonic() + 10
    while not int(proc_status(leader).get("SigCgt", "0"), 16) & (1 << (signal.SIGUSR1 - 1)):
        assert time.monotonic() < deadline, "the leader never set its handler"
        time.sleep(0.02)
    r = cli("dump", "-t", str(leader), "-D", str(tmp_path / "i"), "--leave-running")
    assert r.returncode == 0, r.stderr
    os.kill(leader, signal.SIGUSR1)
    while not (kids := open(f"/proc/{leader}/task/{leader}/children").read().split()):
        assert time.monotonic() < deadline, "the leader never forked"
        time.sleep(0.02)
    orphan = int(kids[0])
    os.killpg(leader, signal.SIGKILL)
    assert holder.stdout.readline().strip() == "reaped"
    while proc_status(orphan).get("State", "")[:1] != "Z":
        assert time.monotonic() < deadline, "the orphan never died"
        time.sleep(0.02)
    return holder, leader, orphan


def test_a_pid_held_as_the_group_of_an_unreaped_zombie_is_waited_for(tmp_path):
    """The leader's PID is free, but as the process group and session of its killed
    child, a zombie its reaper takes a while to wait for, it stays taken. Restore
    waits for the reaper, as for a killed original. Before: clone3 EEXIST."""
    holder, leader, orphan = _holder_with_an_orphan(tmp_path, delay=1.5)
    try:
        assert not os.path.exists(f"/proc/{leader}")
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert r.returncode == 0, r.stderr
        assert proc_status(leader)["State"][:1] in "SR"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader, signal.SIGKILL)
        holder.kill()
        holder.wait()


def test_a_pid_held_as_the_group_of_a_zombie_nobody_reaps_is_refused_by_name(tmp_path):
    holder, leader, orphan = _holder_with_an_orphan(tmp_path, delay=600)
    try:
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert_one_line_error(r, f"PID {leader} is taken", f"process {orphan}")
        assert not os.path.exists(f"/proc/{leader}")
    finally:
        holder.kill()
        holder.wait()


def test_a_pid_held_by_a_zombie_its_parent_does_not_reap_names_the_parent(tmp_path):
    """On one host the killed original must be reaped by its parent first (migrate
    rolled back with only "taken (by sleep)"): the message says whose job that is."""
    p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "i"))
        assert r.returncode == 0, r.stderr
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert_one_line_error(
            r, f"PID {p.pid} is taken", f"its parent {os.getpid()} (", "has not reaped"
        )
    finally:
        p.kill()
        p.wait()


def _zombies_none(images, lc) -> None:
    def change(records):
        records[0]["zombies"] = None

    rewrite_records(images / "pstree", change)


def _sched_as_text(images, lc) -> None:
    def change(records):
        for rec in records:
            if "sched" in rec:
                rec["sched"] = "zz"

    rewrite_records(images / f"core-{lc.pid}", change)


@pytest.mark.parametrize("damage", [_zombies_none, _sched_as_text])
def test_a_record_of_the_wrong_shape_is_refused_in_one_line(dumped, damage):
    """Found by mutating the fields of a dump's records: a field the schemas do not
    reach, of the wrong type, ended the restore in a traceback."""
    lc, images = dumped
    damage(images, lc)
    r = cli("restore", "-D", str(images), "-d")
    assert_one_line_error(r, "a record restore cannot read", "nothing was restored")
    assert_nothing_restored(lc)


def test_an_unwritable_pidfile_is_refused_before_anything_is_restored(dumped, tmp_path):
    """It was written after the tree was let go: the command failed with exit 1
    while the restored tree ran on (and, without -d, was not waited for)."""
    lc, images = dumped
    r = cli("restore", "-D", str(images), "-d", "--pidfile", str(tmp_path / "no" / "root.pid"))
    assert_one_line_error(r, "root.pid")
    assert_nothing_restored(lc)
    pidfile = tmp_path / "root.pid"
    r = cli("restore", "-D", str(images), "-d", "--pidfile", str(pidfile))
    assert r.returncode == 0, r.stderr
    assert pidfile.read_text() == f"{lc.pid}\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".root.pid.")]
    lc.carries_on()


def test_a_pidfile_never_writes_through_a_planted_symbolic_link(dumped, tmp_path):
    """Whoever may write the pidfile's directory could plant a link where the
    restore wrote its temporary pidfile (a fixed name) and have root write the PID
    into any file. The pidfile is now written to a new file of a unique name."""
    lc, images = dumped
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ".root.pid.tmp").symlink_to(victim)
    pidfile = tmp_path / "root.pid"
    r = cli("restore", "-D", str(images), "-d", "--pidfile", str(pidfile))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert not pidfile.is_symlink() and pidfile.read_text() == f"{lc.pid}\n"
    assert oct(pidfile.stat().st_mode & 0o777) == oct(0o644)
    lc.carries_on()
