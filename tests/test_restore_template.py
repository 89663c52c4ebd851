"""Restore from a template (restore/template.py): a process of ours rebuilt from a
pre-dump while the source runs, from which the final restore clones the root and
writes only what changed since. Each test compares the stopped restored process
with the final dump page by page (memcheck), after the mappings changed between
the template and the final dump in the ways programs change them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from memcheck import compare_dump_with_process
from restorelib import start_lifecycle, wait_stopped
from targetlib import CLI, assert_one_line_error, cli, final_dump, predump

from checkpointer.errors import ImageError
from checkpointer.freezer import Thaw

try:
    from checkpointer.restore import RestoreRequest, restore, template
    from checkpointer.restore.images import load
except ImportError:  # pragma: no cover
    template = None

pytestmark = [
    pytest.mark.skipif(template is None, reason="needs checkpointer.restore"),
    pytest.mark.uffd_wp,  # pre-dumps of a running target
]

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def data_bytes(path: Path, pid: int) -> int:
    """Page data the chain ending at `path` gives pid (each page's newest copy)."""
    pieces = load(str(path)).pieces[f"pid-{pid}"]
    return sum(p.end - p.start for p in pieces if p.source is not None)


def children_of_ours() -> set[int]:
    """Our live children (the killed restored roots of earlier tests stay zombies:
    their PIDs must not be reused under the targets' teardown)."""
    me = os.getpid()
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if int(ppid) == me and state != "Z":
                out.add(int(name))
    return out


def restore_stopped(path: Path, tpl) -> object:
    res = restore(RestoreRequest(images_dir=path, template=tpl, leave_stopped=True))
    if tpl is not None:
        tpl.kill()
    wait_stopped(res.root_pid)
    return res


def test_the_root_comes_back_exact_writing_only_what_changed(spawn, tmp_path):
    """Between the template and the final dump: pages written and dropped, a region
    mprotected (split), one moved by mremap, one unmapped and mapped anew, a new
    mapping. The template is updated once in between (cloned from the first)."""
    t = spawn("--anon-mb", "32")
    predump(t.pid, tmp_path / "1")
    tpl = template.build(str(tmp_path / "1"))
    first = tpl.pid
    t.command("write 0 64")
    t.command("dontneed 100 16")
    predump(t.pid, tmp_path / "2", "../1")
    tpl = template.build(str(tmp_path / "2"), tpl)
    assert tpl.pid != first and first not in children_of_ours()  # the first was killed
    t.command("write 40 80")
    t.command("dontneed 10 4")
    t.command("mprotect 300 10")
    t.command("move 400 20")
    t.command("mmap")
    final_dump(t.pid, tmp_path / "3", "../2", "uffd-wp", thaw=Thaw.KILL)
    t.proc.wait(timeout=10)
    res = restore_stopped(tmp_path / "3", tpl)
    assert res.root_pid == t.pid and tpl.reaped
    compare_dump_with_process(tmp_path / "3", t.pid)
    # The template's pages were kept, not written again: of the 32 MiB only what
    # changed since the second pre-dump (and what the template could not hold).
    total = data_bytes(tmp_path / "3", t.pid)
    assert res.bytes_written < total / 8, (res.bytes_written, total)
    assert children_of_ours() == {t.pid}  # the restored root, no template left


def test_without_a_template_every_page_is_written(spawn, tmp_path):
    """The same chain restored from the seed: the measure above can tell the two apart."""
    t = spawn("--anon-mb", "32")
    predump(t.pid, tmp_path / "1")
    t.command("write 0 64")
    final_dump(t.pid, tmp_path / "2", "../1", "uffd-wp", thaw=Thaw.KILL)
    t.proc.wait(timeout=10)
    res = restore_stopped(tmp_path / "2", None)
    compare_dump_with_process(tmp_path / "2", t.pid)
    # All but the vdso's pages (this kernel's own, never written).
    assert res.bytes_written > 0.99 * data_bytes(tmp_path / "2", t.pid) > 30 << 20


def test_a_template_holding_a_pid_the_tree_needs_is_dropped(spawn, tmp_path):
    """On another host the template's PID may be one the dumped tree had: the restore
    drops the template and rebuilds from the seed."""
    if not os.access(NS_LAST_PID, os.W_OK):
        pytest.skip("needs a writable /proc/sys/kernel/ns_last_pid (root)")
    t = spawn("--anon-mb", "8")
    predump(t.pid, tmp_path / "1")
    final_dump(t.pid, tmp_path / "2", "../1", "uffd-wp", thaw=Thaw.KILL)
    t.proc.wait(timeout=10)
    tpl = template.build(str(tmp_path / "1"))
    for _ in range(20):  # an update clones once: the next PID is its
        NS_LAST_PID.write_text(str(t.pid - 1))
        tpl = template.build(str(tmp_path / "1"), tpl)
        if tpl.pid == t.pid:
            break
    if tpl.pid != t.pid:
        tpl.kill()
        pytest.skip(f"PID {t.pid} kept being taken by another process")
    res = restore_stopped(tmp_path / "2", tpl)
    assert res.root_pid == t.pid and tpl.reaped
    compare_dump_with_process(tmp_path / "2", t.pid)
    assert res.bytes_written > 0.99 * data_bytes(tmp_path / "2", t.pid)  # from the seed


def test_a_failed_update_leaves_the_previous_template_usable(spawn, tmp_path):
    t = spawn("--anon-mb", "8")
    predump(t.pid, tmp_path / "1")
    tpl = template.build(str(tmp_path / "1"))
    t.command("write 0 32")
    predump(t.pid, tmp_path / "2", "../1")
    final_dump(t.pid, tmp_path / "3", "../2", "uffd-wp", thaw=Thaw.KILL)
    t.proc.wait(timeout=10)
    broken = tmp_path / "broken"
    broken.mkdir(mode=0o700)
    for f in (tmp_path / "2").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    pages = broken / f"pages-pid-{t.pid}"
    data = bytearray(pages.read_bytes())
    data[-20] ^= 0xFF  # inside the last frame: its checksum fails when it is read
    pages.write_bytes(bytes(data))
    before = children_of_ours()
    with pytest.raises(ImageError):
        template.build(str(broken), tpl)
    assert children_of_ours() == before  # nothing half-built left; the old one kept
    assert Path(f"/proc/{tpl.pid}/status").read_text().count("tracing stop") == 1
    shutil.rmtree(broken)  # not a dump to verify at teardown
    res = restore_stopped(tmp_path / "3", tpl)
    compare_dump_with_process(tmp_path / "3", t.pid)
    assert res.root_pid == t.pid


def test_a_restore_that_fails_kills_the_template_too(spawn, tmp_path):
    t = spawn("--anon-mb", "8")
    predump(t.pid, tmp_path / "1")
    tpl = template.build(str(tmp_path / "1"))
    final_dump(t.pid, tmp_path / "2", "../1", "uffd-wp")  # left stopped: its PID taken
    try:
        with pytest.raises(Exception, match="taken"):
            restore(RestoreRequest(images_dir=tmp_path / "2", template=tpl))
        assert tpl.reaped and tpl.pid not in children_of_ours()
    finally:
        os.kill(t.pid, signal.SIGCONT)
    time.sleep(0.05)
    assert t.alive()


# ---- restore --wait: the same, on one host, for a converge chain ----


def _start_waiting_restore(final: Path, *extra: str) -> subprocess.Popen:
    """`restore --wait` on `final`, returned once it is looking for the dump."""
    p = subprocess.Popen([*CLI, "restore", "-D", str(final), "-v", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = p.stderr.readline()
    assert "waiting for a dump" in line, line + p.stderr.read()
    return p


def test_a_restore_started_before_converge_restores_the_chain_from_a_template(tmp_path):
    chain = tmp_path / "c"
    waiting = _start_waiting_restore(
        chain / "final", "--wait", "120", "-d", "--json", "--leave-stopped"
    )
    lc = start_lifecycle(tmp_path, 32)
    try:
        r = cli("converge", "-t", str(lc.pid), "-D", str(chain))
        assert r.returncode == 0, r.stderr
        lc.reap_original()  # the restore waits for the PIDs to be free
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        assert "template of" in err, err  # a pre-dump was rebuilt while the tree ran
        res = json.loads(out)
        assert res["root_pid"] == lc.pid
        for pid in res["pids"]:
            wait_stopped(pid)
            compare_dump_with_process(chain / "final", pid)
        assert res["bytes_written"] < 16 << 20, res  # of 64 MiB in two processes
        for pid in res["pids"]:
            os.kill(pid, signal.SIGCONT)
        lc.carries_on()
    finally:
        waiting.kill()
        lc.kill()


def test_a_waiting_restore_gives_up_in_one_line(tmp_path):
    before = children_of_ours()
    r = cli("restore", "-D", str(tmp_path / "never"), "--wait", "0.3")
    assert_one_line_error(r, "gave up waiting", "no dump appeared")
    assert children_of_ours() == before


def test_a_waiting_restore_waits_for_the_pids_then_gives_up(spawn, tmp_path):
    t = spawn("--anon-mb", "4")
    r = cli("dump", "-t", str(t.pid), "-D", str(tmp_path / "d"), "--leave-running")
    assert r.returncode == 0, r.stderr
    r = cli("restore", "-D", str(tmp_path / "d"), "--wait", "0.5")
    assert_one_line_error(r, "gave up waiting", f"PID {t.pid} of the dump is still taken")
    assert t.alive()
