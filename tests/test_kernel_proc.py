"""/proc readers against real targets (tests/targets/target.c via the `spawn` fixture)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from targetlib import wait_for_state

from checkpointer.errors import TargetError
from checkpointer.kernel import proc

GONE = 2**22 + 4321  # above the default pid_max: never a live process


def vma_of(maps: list[proc.MapEntry], addr: int) -> proc.MapEntry:
    return next(m for m in maps if m.start <= addr < m.end)


def test_parse_stat_comm_with_parentheses_and_spaces():
    fields = " ".join(str(i) for i in range(4, 53))
    line = f"123 (we) ird (name)) R {fields}\n".encode()
    st = proc.parse_stat(123, line)
    assert st.comm == "we) ird (name)"
    assert st.state == "R"
    assert (st.ppid, st.pgrp, st.session) == (4, 5, 6)
    assert st.starttime == 22
    assert (st.start_code, st.end_code, st.start_stack) == (26, 27, 28)
    assert (st.start_data, st.end_data, st.start_brk) == (45, 46, 47)
    assert (st.arg_start, st.arg_end, st.env_start, st.env_end, st.exit_code) == (
        48,
        49,
        50,
        51,
        52,
    )


def test_read_stat_of_a_real_target(spawn):
    t = spawn("--threads", "2")
    st = proc.read_stat(t.pid, brk=True)
    assert st.pid == t.pid and st.ppid == os.getpid()
    assert st.comm == Path(t.proc.args[0]).name[:15]
    assert st.state in "SR"
    assert st.num_threads == 4  # main + 2 idle + checker
    assert st.starttime > 0
    assert (st.pgrp, st.session) == (os.getpgid(t.pid), os.getsid(t.pid))
    assert 0 < st.start_code < st.end_code <= st.start_data < st.end_data
    assert st.arg_start < st.arg_end <= st.env_start < st.env_end
    heap = next(m for m in proc.read_maps(t.pid) if m.path == "[heap]")
    assert st.start_brk <= heap.start < heap.end == st.brk
    assert heap.start <= t.regions["heap"][0] < st.brk
    assert proc.read_stat(t.pid, brk=False).brk == -1
    assert proc.read_state(t.pid) in "SR"


def test_threads_and_children(spawn):
    t = spawn("--threads", "3", "--fork")
    tids = proc.list_threads(t.pid)
    assert tids[0] == t.pid and len(tids) == 5
    assert proc.list_children(t.pid) == [t.child]
    assert proc.read_stat(t.child).ppid == t.pid
    assert proc.read_stat(t.pid, tids[1], brk=False).pid == tids[1]


def test_status_creds_and_signal_masks(spawn):
    t = spawn()
    st = proc.read_status(t.pid)
    assert st["Pid"] == str(t.pid) and st["State"][0] in "SR"
    assert proc.tracer_pid(t.pid) == 0
    creds = proc.read_creds(t.pid)
    assert creds["uid"] == [os.getuid()] * 4 and creds["gid"] == [os.getgid()] * 4
    assert creds["groups"] == sorted(os.getgroups()) or isinstance(creds["groups"], list)
    assert creds["cap_bnd"] != 0 and creds["cap_amb"] == 0
    masks = proc.read_signal_masks(t.pid, t.pid)
    assert set(masks) == {"blocked", "pending", "shared_pending", "sigignore", "sigcatch"}
    assert all(isinstance(v, int) for v in masks.values())


def test_maps_regions_and_vmflags(spawn):
    t = spawn()
    # Stopped: a thread starting up maps its stack between the two reads below
    # (seen once: smaps had two mappings maps did not).
    os.kill(t.pid, signal.SIGSTOP)
    assert wait_for_state(t.pid, "T").startswith("T")
    maps = proc.read_maps(t.pid)
    assert maps == sorted(maps) and all(m.start < m.end for m in maps)
    anon_start, anon_size = t.regions["anon"]
    anon = vma_of(maps, anon_start)
    assert anon.prot == "rw-p" and anon.path == "" and anon.inode == 0
    assert anon.end >= anon_start + anon_size
    pn = vma_of(maps, t.regions["protnone"][0])
    assert pn.prot == "---p"
    shared = vma_of(maps, t.regions["shared"][0])
    assert shared.prot == "rw-s" and shared.path == "/dev/zero" and shared.deleted
    names = {m.path for m in maps}
    assert {"[heap]", "[stack]", "[vdso]"} <= names
    exe = [m for m in maps if m.path == str(t.proc.args[0])]
    assert exe and exe[0].offset == 0 and exe[0].dev.count(":") == 1 and exe[0].inode > 0

    flags = proc.read_smaps_vmflags(t.pid)
    assert set(flags) == {m.start for m in maps}
    assert {"rd", "wr", "mr", "mw", "me"} <= set(flags[anon.start])
    assert "rd" not in flags[pn.start]
    assert "sh" in flags[shared.start]


def test_maps_path_with_spaces_and_deleted(spawn, tmp_path):
    path = tmp_path / "a file (with) spaces.bin"
    path.write_bytes(bytes(range(256)) * 256)
    t = spawn("--file", str(path))
    m = vma_of(proc.read_maps(t.pid), t.regions["file"][0])
    assert (m.path, m.deleted) == (str(path), False)
    path.unlink()
    m = vma_of(proc.read_maps(t.pid), t.regions["file"][0])
    assert (m.path, m.deleted) == (str(path), True)


def test_parse_maps_edge_cases():
    data = (
        b"00400000-00401000 r-xp 00000000 fd:01 12 /bin/with  two  spaces\n"
        b"00401000-00402000 rw-p 00001000 00:00 0 \n"
        b"7fff0000-7fff1000 rw-s 00000000 00:01 5 /memfd:x (deleted)\n"
        b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n"
    )
    a, b, c, d = proc.parse_maps(data)
    assert a == proc.MapEntry(0x400000, 0x401000, "r-xp", 0, "fd:01", 12, "/bin/with  two  spaces")
    assert (b.path, b.offset, b.inode) == ("", 0x1000, 0)
    assert (c.path, c.deleted, c.prot) == ("/memfd:x", True, "rw-s")
    assert (d.start, d.path) == (0xFFFFFFFFFF600000, "[vsyscall]")


def test_auxv_links_rlimits_personality(spawn):
    t = spawn()
    auxv = proc.read_auxv(t.pid)
    assert len(auxv) % 16 == 0 and auxv[-16:] == bytes(16)
    pairs = dict(
        (int.from_bytes(auxv[i : i + 8], "little"), int.from_bytes(auxv[i + 8 : i + 16], "little"))
        for i in range(0, len(auxv), 16)
    )
    assert pairs[6] == os.sysconf("SC_PAGE_SIZE")  # AT_PAGESZ
    assert proc.read_link(t.pid, "exe") == str(t.proc.args[0])
    assert proc.read_link(t.pid, "cwd") == os.getcwd()
    assert proc.read_link(t.pid, "root") == "/"
    assert proc.read_link(t.pid, "fd/999") is None
    limits = proc.read_rlimits(t.pid)
    assert len(limits) == 16
    soft, hard = resource.prlimit(t.pid, resource.RLIMIT_NOFILE)
    assert limits["nofile"] == [soft, hard]
    inf = resource.RLIM_INFINITY
    for key, (s, h) in limits.items():
        want = resource.prlimit(t.pid, proc.RLIMIT_NUMBERS[key])
        assert [s, h] == [-1 if v == inf else v for v in want], key
    assert proc.read_personality(t.pid) == 0


@pytest.mark.skipif(not shutil.which("setarch"), reason="needs setarch")
def test_personality_addr_no_randomize():
    p = subprocess.Popen(["setarch", "-R", "sleep", "10"])
    try:
        deadline = time.monotonic() + 5
        while proc.read_link(p.pid, "exe") and "sleep" not in proc.read_link(p.pid, "exe"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert proc.read_personality(p.pid) == 0x0040000  # ADDR_NO_RANDOMIZE
    finally:
        p.kill()
        p.wait()


def test_fds_with_pos_and_flags(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 1000)
    code = (
        "import os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_APPEND)\n"
        "os.lseek(fd, 123, 0)\n"
        "print(fd, flush=True)\n"
        "time.sleep(30)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        fd = int(p.stdout.readline())
        fds = {f.fd: f for f in proc.read_fds(p.pid)}
        f = fds[fd]
        assert f.target == str(path) and f.pos == 123
        assert f.flags & 0o3 == os.O_RDWR and f.flags & os.O_APPEND
        assert f.mnt_id > 0
        assert fds[1].target.startswith("pipe:[")
        assert proc.read_fdinfo(p.pid, fd)["pos"] == "123"
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize(
    "reader",
    [
        proc.list_threads,
        proc.list_children,
        proc.read_stat,
        proc.read_status,
        proc.tracer_pid,
        proc.read_maps,
        proc.read_smaps_vmflags,
        proc.read_auxv,
        proc.read_fds,
        proc.read_creds,
        proc.read_rlimits,
        proc.read_personality,
        lambda pid: proc.read_link(pid, "exe"),
        lambda pid: proc.read_signal_masks(pid, pid),
    ],
)
def test_missing_process_is_target_error(reader):
    with pytest.raises(TargetError, match=f"process {GONE} does not exist"):
        reader(GONE)


def test_exists_and_task_state(spawn):
    t = spawn("--threads", "1")
    tid = proc.list_threads(t.pid)[1]
    assert proc.exists(t.pid) and not proc.exists(GONE)
    assert proc.read_state(t.pid, tid) in "SR"


def test_shared_descriptions_are_grouped_in_n_log_n_kcmp_calls(tmp_path, monkeypatch):
    """fds sharing one open file description (dup) get one "ofd" id, others their
    own. Each fd was compared with every earlier one on the same file: a program
    with 5,000 fds on one file took 31 s frozen."""
    from checkpointer import collect
    from checkpointer.kernel import kcmp

    path = tmp_path / "f"
    path.write_text("x")
    opened = [os.open(path, os.O_RDONLY) for _ in range(200)]
    dups = [os.dup(fd) for fd in opened[:50]]  # each shares its original's description
    calls = []
    real = kcmp.syscall
    monkeypatch.setattr(kcmp, "syscall", lambda *a: calls.append(a) or real(*a))
    try:
        st = os.stat(path)
        records = [
            {"fd": fd, "target": str(path), "stat": {"dev": st.st_dev, "ino": st.st_ino}}
            for fd in opened + dups
        ]
        collect.mark_shared_descriptions({os.getpid(): records})
        ofd = {r["fd"]: r["ofd"] for r in records}
        assert [ofd[d] for d in dups] == [ofd[o] for o in opened[:50]]
        assert len(set(ofd.values())) == 200
        assert len(calls) < 250 * 20, len(calls)  # n log n, not n^2 / 2 (~25,000)
    finally:
        for fd in opened + dups:
            os.close(fd)


def test_a_frozen_tree_pins_each_process_task_dir(spawn, monkeypatch):
    """While the freezer holds a tree, task_dir answers without reading the
    leader's stat (the answer cannot change), and the thaw lets go of it. A
    process gone before the pin is left unpinned, without failing the pin."""
    from checkpointer.freezer import Freezer

    t = spawn()
    reads = []
    real = proc.read_state
    with Freezer(t.pid):
        monkeypatch.setattr(proc, "read_state", lambda *a: reads.append(a) or real(*a))
        assert proc.task_dir(t.pid) == f"/proc/{t.pid}"
        assert reads == []
        monkeypatch.undo()
    assert t.pid not in proc._pinned_task_dirs
    proc.pin_task_dirs([2**22 + 77])  # no such process
    assert 2**22 + 77 not in proc._pinned_task_dirs
