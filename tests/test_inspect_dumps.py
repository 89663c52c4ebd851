"""The inspection commands on real dumps of a real target: a pre-dump shows what it
holds, a final dump missing a file a restore needs is refused, and a writer's temp
dir is never taken for a dump."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from targetlib import assert_one_line_error, cli


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


@pytest.mark.damages_images
@pytest.mark.parametrize("kind", ["core", "mm", "fds", "pagemap-pid", "pages-pid"])
def test_a_final_dump_missing_a_process_file_is_refused(chain, tmp_path, kind):
    t, c = chain
    bad = tmp_path / "bad"
    shutil.copytree(c, bad, symlinks=True)
    name = f"{kind}-{t.pid}"
    os.unlink(bad / "2" / name)
    r = cli("verify", str(bad / "2"))
    assert_one_line_error(r, name)
    assert cli("verify", str(c / "2")).returncode == 0
    views = {"core": ["ps"], "mm": ["mems", "rss"], "fds": ["fds"]}.get(kind, [])
    if kind in ("core", "mm"):
        assert_one_line_error(cli("show", str(bad / "2")), name)
    for view in views:
        assert_one_line_error(cli("x", str(bad / "2"), view), name)


def test_a_pre_dump_lacks_registers_and_fds_legitimately(chain, tmp_path):
    t, c = chain
    names = os.listdir(c / "1")
    assert f"core-{t.pid}" not in names and f"fds-{t.pid}" not in names
    assert f"mm-{t.pid}" in names


def test_a_temp_dir_just_before_its_rename_is_not_a_dump(chain, tmp_path):
    """The writer's last step is the rename of `.NAME.tmp-XXXXXXXX` to NAME: a run
    SIGKILLed before it leaves the temp dir, complete inventory and all. Renaming a
    committed dump back to a temp name builds exactly that state."""
    t, c = chain
    r = cli("pre-dump", "-t", str(t.pid), "-D", str(c / "3"), "--prev-images-dir", "../2")
    assert r.returncode == 0, r.stderr
    tmp = c / ".3.tmp-k2x9_q0a"
    os.rename(c / "3", tmp)
    for args in (["verify", tmp], ["show", tmp], ["x", tmp, "ps"], ["x", tmp, "mems"]):
        assert_one_line_error(cli(*map(str, args)), "incomplete dump", tmp.name)
    via_link = c / "link"
    os.symlink(tmp.name, via_link)
    assert_one_line_error(cli("verify", str(via_link)), "incomplete dump")
    os.unlink(via_link)
    r = cli("pre-dump", "-t", str(t.pid), "-D", str(c / "4"), "--prev-images-dir", f"../{tmp.name}")
    assert_one_line_error(r, "incomplete dump")
    assert not (c / "4").exists()
    # renamed into place, it is the dump it was
    os.rename(tmp, c / "3")
    r = cli("verify", str(c / "3"))
    assert r.returncode == 0, r.stderr
    # and no dump is ever written under a name a reader would refuse
    r = cli("pre-dump", "-t", str(t.pid), "-D", str(c / ".5.tmp-abcdefgh"))
    assert_one_line_error(r, ".5.tmp-abcdefgh")
    assert not (c / ".5.tmp-abcdefgh").exists()


def test_x_rss_counts_pages_a_child_shares_with_its_parent(spawn, tmp_path):
    """A frozen final dump stores a forked child's pages that are still its
    parent's as "same" runs: `x rss` gives them their own column (it failed with
    an IndexError on every such dump)."""
    t = spawn("--fork")
    r = cli("dump", "-t", str(t.pid), "-D", str(tmp_path / "d"), "--leave-stopped")
    assert r.returncode == 0, r.stderr
    r = cli("x", str(tmp_path / "d"), "rss", "--json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    cols = table["columns"]
    assert cols == ["PID", "START", "END", "PAGES", "HERE", "PARENT", "ZERO", "SAME", "PATH"]
    child = t.child
    same = sum(row[cols.index("SAME")] for row in table["rows"] if row[0] == child)
    assert same > 0
    for row in table["rows"]:
        assert sum(row[4:8]) <= row[3]
