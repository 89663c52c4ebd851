"""`checkpointer migrate` over a real ssh to a local sshd, and its faults.

The "remote host" is an sshd started on 127.0.0.1 at a free port with generated
keys (tests/sshd.py); nothing leaves the machine. Both ends share one PID space
here, so an end-to-end migration takes the same-host path (the source is killed
before the restore); `--same-pid-space no` forces the other path, whose restore then
fails on the PIDs the source still holds: the "restore fails" fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sshd import remote_command, start_sshd, stop_sshd
from targetlib import assert_one_line_error, cli, proc_status

from checkpointer.errors import ImageError
from checkpointer.images import Dump

try:
    import checkpointer.restore  # noqa: F401

    HAVE_RESTORE = True
except ImportError:
    HAVE_RESTORE = False

needs_restore = pytest.mark.skipif(not HAVE_RESTORE, reason="needs checkpointer.restore")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


def migrate(sshd, pid: int, remote_dir: Path, *extra: str, wrapper=(), timeout=300):
    return cli(
        "migrate", "-t", str(pid), "--to", sshd.host,
        *[f"--ssh-option={o}" for o in sshd.ssh_options],
        "--remote-command", remote_command(*wrapper), "--remote-dir", str(remote_dir),
        "--tracker", "uffd-wp", *extra, timeout=timeout,
    )  # fmt: skip


def complete_dumps(remote_dir: Path) -> list[str]:
    """Every directory under remote_dir, hidden ones too, that opens as a dump."""
    out = []
    for p in remote_dir.iterdir() if remote_dir.exists() else []:
        try:
            Dump.open(str(p)).close()
            out.append(p.name)
        except ImageError:
            pass
    return out


def assert_rolled_back(r, target, remote_dir: Path, *words: str, sigkilled=False) -> None:
    """The migration failed with one line, the source runs on, and no complete-looking
    chain is left at the destination (a SIGKILLed receiver cannot remove the
    pre-dumps it committed, but never holds a final dump)."""
    assert_one_line_error(r, "rolled back", *words)
    assert target.alive()
    assert proc_status(target.pid)["State"][0] in "RS", proc_status(target.pid)["State"]
    target.assert_carries_on()
    deadline = time.monotonic() + 10  # a cut receiver cleans up when it sees the cut
    while complete_dumps(remote_dir) and not sigkilled:
        assert time.monotonic() < deadline, complete_dumps(remote_dir)
        time.sleep(0.1)
    for name in complete_dumps(remote_dir):
        assert Dump.open(str(remote_dir / name)).inventory["kind"] == "pre-dump", name


# ---- faults: the source keeps running, nothing complete at the destination ----


@pytest.mark.uffd_wp
@pytest.mark.parametrize(
    "kind, after, action, words",
    [
        ("pre-dump", 1 << 20, "cut", ["link lost"]),
        ("dump", 2000, "cut", ["link lost"]),
        ("pre-dump", 1 << 20, "flip", ["checksum mismatch"]),
        ("dump", 100, "flip", ["checksum mismatch"]),
        ("pre-dump", 1 << 20, "kill", ["link lost"]),
        ("dump", 2000, "kill", ["link lost"]),
    ],
)
def test_broken_stream_rolls_back(sshd, spawn, tmp_path, kind, after, action, words):
    t = spawn("--anon-mb", "64", "--hot-pages", "64")
    remote = tmp_path / "remote"
    wrapper = ("streamfault.py", "--kind", kind, "--after", str(after), "--do", action)
    r = migrate(sshd, t.pid, remote, "--min-pages", "1000", wrapper=wrapper)
    assert_rolled_back(r, t, remote, *words, sigkilled=action == "kill")


@pytest.mark.uffd_wp
def test_link_cut_by_killing_the_ssh_session_mid_pre_dump(sshd, spawn, tmp_path):
    t = spawn("--anon-mb", "256", "--hot-pages", "64")
    remote = tmp_path / "remote"
    before = set(sshd.sessions())
    cutter_done = threading.Event()

    def cut_when_streaming():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(p.name.startswith(".pre-1.tmp-") for p in remote.glob(".*")):
                for pid in set(sshd.sessions()) - before:
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        cutter_done.set()

    threading.Thread(target=cut_when_streaming, daemon=True).start()
    r = migrate(sshd, t.pid, remote)
    cutter_done.wait(70)
    assert_rolled_back(r, t, remote, "link lost")


@pytest.mark.uffd_wp
def test_full_disk_at_the_destination_rolls_back(sshd, spawn, tmp_path):
    remote = tmp_path / "small"
    remote.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(remote)]).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        t = spawn("--anon-mb", "64", "--hot-pages", "64")
        r = migrate(sshd, t.pid, remote)
        assert_rolled_back(r, t, remote, "No space left on device")
        assert os.listdir(remote) == []
    finally:
        subprocess.run(["umount", "-l", str(remote)], check=True)


@pytest.mark.uffd_wp
def test_failed_restore_at_the_destination_rolls_back(sshd, spawn, tmp_path):
    # Telling migrate the destination has its own PID space keeps the source alive
    # through the restore, so the restore finds every PID taken (EEXIST).
    t = spawn("--anon-mb", "16", "--hot-pages", "8")
    remote = tmp_path / "remote"
    r = migrate(sshd, t.pid, remote, "--same-pid-space", "no")
    assert_rolled_back(r, t, remote, "restoring at the destination")
    assert complete_dumps(remote) == []


def test_unreachable_destination_is_one_line(spawn, tmp_path):
    t = spawn("--anon-mb", "1")
    r = cli("migrate", "-t", str(t.pid), "--to", "root@127.0.0.1", "--ssh-option=-p1",
            "--ssh-option=-oConnectTimeout=5")  # fmt: skip
    assert_one_line_error(r, "127.0.0.1")
    t.assert_carries_on()


def test_migrate_needs_one_destination(spawn):
    r = cli("migrate", "-t", "1")
    assert r.returncode == 2 and "exactly one of --to and --page-server" in r.stderr


# ---- end to end (restore on the destination) ----


def _reap_in_background(target) -> None:
    """Our target is our child: reap it when migrate kills it, so its PID is free."""
    threading.Thread(target=target.proc.wait, daemon=True).start()


@needs_restore
@pytest.mark.uffd_wp
def test_c_workload_migrates_and_keeps_working(sshd, spawn, tmp_path):
    t = spawn("--anon-mb", "64", "--hot-pages", "0")
    anon_addr, anon_size = t.regions["anon"]
    _reap_in_background(t)
    remote = tmp_path / "remote"
    r = migrate(sshd, t.pid, remote, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["same_pid_space"] and res["root_pid"] == t.pid
    assert res["iterations"][-1]["kind"] == "dump" and res["stop_rule"]
    assert res["downtime_ms"] >= res["frozen_ms"] > 0
    pid = res["root_pid"]
    try:
        heartbeat = t.regions["heartbeat"][0]
        before = t.read_mem(heartbeat, 8, pid)
        time.sleep(0.2)
        assert t.read_mem(heartbeat, 8, pid) != before, "restored tree does not run"
        # Its memory is what the source held at the final dump (hot-pages 0: the
        # anon region does not change after it).
        with Dump.open(str(remote / "final")) as final:
            assert final.read_memory(pid, anon_addr, anon_size) == t.read_mem(
                anon_addr, anon_size, pid
            )
    finally:
        os.kill(pid, signal.SIGKILL)


PY_WORKLOAD = textwrap.dedent(
    """
    import hashlib, sys, time
    table = {i: hashlib.sha256(str(i).encode()).hexdigest() for i in range(50000)}
    digest = hashlib.sha256(repr(sorted(table.items())).encode()).hexdigest()
    print(digest, flush=True)
    n = 0
    while True:
        n += 1
        now = hashlib.sha256(repr(sorted(table.items())).encode()).hexdigest()
        with open(sys.argv[1], "a") as f:
            f.write(f"{n} {now}\\n")
        time.sleep(0.05)
    """
)


@needs_restore
@pytest.mark.uffd_wp
def test_python_workload_migrates_and_keeps_working(sshd, tmp_path):
    log = tmp_path / "log"
    p = subprocess.Popen([sys.executable, "-c", PY_WORKLOAD, str(log)], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    digest = p.stdout.readline().strip()
    threading.Thread(target=p.wait, daemon=True).start()
    try:
        r = migrate(sshd, p.pid, tmp_path / "remote", "--json")
        assert r.returncode == 0, r.stderr
        pid = json.loads(r.stdout)["root_pid"]
        lines = len(log.read_text().splitlines())
        time.sleep(0.5)
        later = log.read_text().splitlines()
        assert len(later) > lines, "the migrated workload stopped working"
        assert later[-1].split()[1] == digest  # its data survived intact
        os.kill(pid, signal.SIGKILL)
    finally:
        p.kill()
