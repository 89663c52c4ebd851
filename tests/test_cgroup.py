"""--freeze-cgroup: freeze a whole cgroup v2 (a container) with cgroup.freeze first."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from memcheck import compare_dump_with_process
from targetlib import cli, proc_status, wait_for_state

from checkpointer.images import Dump


def cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2" and os.access(fields[1], os.W_OK):
            return Path(fields[1])
    return None


@pytest.fixture
def cgroup():
    root = cgroup2_root()
    if root is None:
        pytest.skip("needs a writable cgroup v2 hierarchy (cgroup2 mount)")
    path = root / f"checkpointer-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    if not (path / "cgroup.freeze").exists():
        path.rmdir()
        pytest.skip("needs the cgroup v2 freezer (cgroup.freeze)")
    yield path
    (path / "cgroup.freeze").write_text("0")
    for pid in (path / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    for _ in range(100):
        try:
            path.rmdir()
            break
        except OSError:
            time.sleep(0.05)


def test_freeze_cgroup_dumps_the_whole_group(spawn, cgroup, tmp_path):
    t = spawn("--threads", "2", "--fork")
    for pid in (t.pid, t.child):
        (cgroup / "cgroup.procs").write_text(str(pid))
    images = tmp_path / "d"
    r = cli(
        "dump",
        "-t",
        str(t.pid),
        "-D",
        str(images),
        "--freeze-cgroup",
        str(cgroup),
        "--leave-stopped",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(Dump.open(images).pids) == sorted([t.pid, t.child])
    assert "frozen 0" in (cgroup / "cgroup.events").read_text()  # the group is thawed
    assert wait_for_state(t.pid, "T").startswith("T")
    compare_dump_with_process(images, t.pid)
    compare_dump_with_process(images, t.child)
    os.kill(t.pid, 18)
    os.kill(t.child, 18)
    assert wait_for_state(t.pid, "RS")[0] in "RS"
    assert proc_status(t.pid)["TracerPid"] == "0"


def test_freeze_cgroup_that_is_not_one_is_a_clear_error(spawn, tmp_path):
    t = spawn()
    r = cli(
        "dump",
        "-t",
        str(t.pid),
        "-D",
        str(tmp_path / "d"),
        "--freeze-cgroup",
        str(tmp_path),
        "--leave-running",
    )
    assert r.returncode == 1 and "cgroup" in r.stderr and "Traceback" not in r.stderr
    assert t.alive() and proc_status(t.pid)["State"][0] in "RS"


def test_restore_puts_each_process_back_in_its_cgroup(cgroup, tmp_path):
    """A service in its unit's cgroup came back in the restorer's ("0::/"), out of
    its unit, its limits and its accounting."""
    import subprocess

    p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        (cgroup / "cgroup.procs").write_text(str(p.pid))
        path = "/" + str(cgroup.relative_to(cgroup2_root()))
        assert f"0::{path}\n" in Path(f"/proc/{p.pid}/cgroup").read_text()
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "images"))
        assert r.returncode == 0, r.stderr
        p.wait(timeout=10)
        r = cli("restore", "-D", str(tmp_path / "images"), "-d")
        assert r.returncode == 0, r.stderr
        assert f"0::{path}\n" in Path(f"/proc/{p.pid}/cgroup").read_text()
    finally:
        subprocess.run(["kill", "-9", str(p.pid)], check=False)


def test_a_cgroup_gone_at_restore_leaves_the_process_in_the_restorers(cgroup, tmp_path):
    import subprocess

    p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        (cgroup / "cgroup.procs").write_text(str(p.pid))
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "images"))
        assert r.returncode == 0, r.stderr
        p.wait(timeout=10)
        for _ in range(100):  # the killed process leaves the group as it is reaped
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        r = cli("restore", "-D", str(tmp_path / "images"), "-d")
        assert r.returncode == 0, r.stderr
        assert "stays in the restorer's cgroup" in r.stderr
        assert _unified_cgroup(p.pid) == _unified_cgroup(os.getpid())
    finally:
        subprocess.run(["kill", "-9", str(p.pid)], check=False)
        cgroup.mkdir(exist_ok=True)  # for the fixture's clean-up


def _unified_cgroup(pid: int) -> list[str]:
    return [x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::")]


def test_a_cgroup_path_leading_outside_the_hierarchy_is_not_followed(tmp_path):
    """An image's cgroup path is a word from outside: "/../../x" must not make the
    restorer write (or create) a file outside the cgroup hierarchy."""
    from checkpointer.kernel import cgroup

    mount = tmp_path / "mnt"
    (mount / "g").mkdir(parents=True)
    for bad in ("/../../x", "/../x"):
        with pytest.raises(OSError):
            cgroup.move_to_cgroup2(str(mount), bad, os.getpid())
    assert not (tmp_path / "x").exists() and not (tmp_path / "cgroup.procs").exists()
    with pytest.raises(FileNotFoundError):  # a group without cgroup.procs: none made
        cgroup.move_to_cgroup2(str(mount), "/g", os.getpid())
    assert not (mount / "g" / "cgroup.procs").exists()


def test_a_cgroup_frozen_before_the_dump_stays_frozen(spawn, cgroup, tmp_path):
    """The admin had frozen the group: the dump froze it again and thawed it at
    the end, waking what was meant to stay frozen."""
    t = spawn("--fork")
    for pid in (t.pid, t.child):
        (cgroup / "cgroup.procs").write_text(str(pid))
    (cgroup / "cgroup.freeze").write_text("1")
    deadline = time.monotonic() + 10
    while "frozen 1" not in (cgroup / "cgroup.events").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    images = tmp_path / "d"
    r = cli("dump", "-t", str(t.pid), "-D", str(images), "--freeze-cgroup", str(cgroup),
            "--leave-running")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (cgroup / "cgroup.freeze").read_text().strip() == "1"
    deadline = time.monotonic() + 10
    while "frozen 1" not in (cgroup / "cgroup.events").read_text():
        assert time.monotonic() < deadline, "the group was left thawed"
        time.sleep(0.01)
    assert proc_status(t.pid)["TracerPid"] == "0"
    assert sorted(Dump.open(images).pids) == sorted([t.pid, t.child])
