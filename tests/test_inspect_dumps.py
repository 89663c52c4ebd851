"""The inspection commands on real dumps of a real target: a pre-dump shows what it
holds."""

from __future__ import annotations

import os

import pytest
from targetlib import cli


@pytest.fixture
def chain(spawn, tmp_path):
    """A pre-dump `1` and a final dump `2` on it of a running two-process tree."""
    t = spawn("--fork", "--hot-pages", "8")
    r = cli("pre-dump", "-t", str(t.pid), "-D", str(tmp_path / "c" / "1"))
    assert r.returncode == 0, r.stderr
    r = cli(
        "dump", "-t", str(t.pid), "-D", str(tmp_path / "c" / "2"), "--prev-images-dir", "../1",
        "--track-mem", "--leave-running",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return t, tmp_path / "c"


def test_show_and_x_read_a_pre_dump(chain):
    t, c = chain
    pre = str(c / "1")
    assert cli("verify", pre).returncode == 0
    r = cli("show", pre)
    assert r.returncode == 0, r.stderr
    assert "kind pre-dump, complete" in r.stdout
    line = next(s for s in r.stdout.splitlines() if s.strip().startswith(f"{t.pid} (ppid"))
    assert "vmas" in line and " here" in line and "[" not in line  # no state: no core
    r = cli("show", pre, "--json")
    assert r.returncode == 0, r.stderr
    assert '"comm"' not in r.stdout and f'"pid": {t.pid}' in r.stdout
    r = cli("x", pre, "ps")
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    assert head.split() == ["PID", "PPID", "PGID", "SID", "THREADS"]
    assert rows and rows[0].split()[0] == str(t.pid)
    r = cli("x", pre, "mems")
    assert r.returncode == 0 and "heap" in r.stdout, r.stderr
    # the final dump shows state and command, as before
    r = cli("x", str(c / "2"), "ps")
    assert r.returncode == 0 and r.stdout.split()[5:7] == ["STATE", "COMM"], r.stdout


def test_a_pre_dump_lacks_registers_and_fds_legitimately(chain, tmp_path):
    t, c = chain
    names = os.listdir(c / "1")
    assert f"core-{t.pid}" not in names and f"fds-{t.pid}" not in names
    assert f"mm-{t.pid}" in names
