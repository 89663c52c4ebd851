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
