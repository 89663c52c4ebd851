"""Format version 2 records of real processes: what a restore needs comes back exactly.

The C target's --state sets every piece to a value that is not the default and
prints it (targetlib.Target.set_state); the dump must hold the same values, and
the target must carry on unharmed by the syscalls injected to read them.
"""

from __future__ import annotations

import os
import signal
import struct
import time

import pytest
from targetlib import proc_status, wait_for_state

from checkpointer import collect
from checkpointer.dump import DumpRequest, dump, pre_dump
from checkpointer.freezer import Thaw
from checkpointer.images import Dump
from checkpointer.kernel import abi, proc, ptrace

SA_SIGINFO, SA_ONSTACK, SA_RESTART = 0x4, 0x08000000, 0x10000000
SI_QUEUE = -1
SIG_IGN = 1


def bit(sig: int) -> int:
    return 1 << (sig - 1)


def siginfo_fields(raw: bytes) -> tuple[int, int, int, int]:
    """(si_signo, si_code, si_pid, si_value) of an x86_64 siginfo_t (rt signals layout)."""
    signo, _errno, code, _pad, pid, _uid, value = struct.unpack_from("<iiiiIIq", raw)
    return signo, code, pid, value


def full_dump(t, path, thaw=Thaw.RUNNING) -> Dump:
    dump(DumpRequest(pid=t.pid, images_dir=path, thaw=thaw, progress=False))
    return Dump.open(path)


@pytest.fixture
def state_target(spawn):
    t = spawn("--state", "--threads", "2")
    # READY comes right after pthread_create: let every thread get to its own code
    # (glibc registers its rseq area and robust list as a thread starts).
    time.sleep(0.2)
    return t


def test_signal_state_comes_back_exactly(state_target, tmp_path):
    t = state_target
    status_before = proc_status(t.pid)
    d = full_dump(t, tmp_path / "d")
    process, threads = d.core(t.pid)

    actions = {a["sig"]: a for a in process["sigactions"]}
    assert sorted(actions) == [s for s in range(1, 65) if s not in (9, 19)]
    usr1 = actions[signal.SIGUSR1]
    assert usr1["handler"] == int(t.set_state["usr1"][0], 16)
    assert usr1["flags"] & abi.SA_RESTORER  # glibc's __restore_rt: x86_64 needs it
    assert usr1["flags"] & (SA_SIGINFO | SA_ONSTACK | SA_RESTART) == (
        SA_SIGINFO | SA_ONSTACK | SA_RESTART
    )
    assert usr1["mask"] == bit(signal.SIGUSR2) | bit(signal.SIGTERM)
    libc = [v for v in d.mm(t.pid).vmas if "libc" in v["path"] and "x" in v["prot"]]
    assert any(v["start"] <= usr1["restorer"] < v["end"] for v in libc)
    assert actions[signal.SIGTRAP]["handler"] > SIG_IGN
    assert actions[signal.SIGPIPE]["handler"] == SIG_IGN
    assert actions[signal.SIGTERM]["handler"] == 0
    caught = {s for s, a in actions.items() if a["handler"] > SIG_IGN}
    assert sum(bit(s) for s in caught) == process["sigcatch"]

    # The blocked SIGUSR2 queued with sigqueue to the process, and to the main thread.
    assert [siginfo_fields(i) for i in process["shared_siginfo"]] == [
        (signal.SIGUSR2, SI_QUEUE, t.pid, 4242)
    ]
    main = next(th for th in threads if th["tid"] == t.pid)
    assert [siginfo_fields(i) for i in main["siginfo"]] == [(signal.SIGUSR2, SI_QUEUE, t.pid, 77)]
    assert all(th["siginfo"] == [] for th in threads if th["tid"] != t.pid)

    # Injected syscalls left the target as it was: handlers (SIGTRAP's too, which a
    # single-stepped injection would reset), masks, queued signals.
    t.assert_carries_on()
    after = proc_status(t.pid)
    for key in ("SigCgt", "SigIgn", "ShdPnd", "SigPnd", "SigBlk"):
        assert after[key] == status_before[key], key


def test_timers_umask_and_prctl(state_target, tmp_path):
    t = state_target
    d = full_dump(t, tmp_path / "d")
    process = d.core(t.pid).process
    real_interval, real_left = process["itimers"]["real"]
    assert real_interval == 500_000_000
    assert 990_000_000 < real_left <= 1_000_000_000
    prof_interval, prof_left = process["itimers"]["prof"]
    # CPU-time timers count in scheduler ticks: the value may be a tick above what was set.
    assert prof_interval == 250_000 and abs(prof_left - 2_000_000_000) < 10_000_000
    assert process["itimers"]["virtual"] == [0, 0]
    assert process["umask"] == 0o027
    assert process["prctl"] == {
        "dumpable": 1,
        "pdeathsig": signal.SIGKILL,
        "child_subreaper": 1,
        "no_new_privs": 0,
        "thp_disable": 1,
        "securebits": 0,
    }
    assert process["seccomp"] == 0


def test_thread_state(state_target, tmp_path):
    t = state_target
    d = full_dump(t, tmp_path / "d")
    _, threads = d.core(t.pid)
    tid, sp, size = (int(x, 0) for x in t.set_state["altstack"])
    by_tid = {th["tid"]: th for th in threads}
    assert by_tid[tid]["sigaltstack"] == {"sp": sp, "flags": 0, "size": size}
    assert by_tid[tid]["comm"] == "altstack-thr"
    assert by_tid[t.pid]["comm"] == proc.read_comm(t.pid)
    vmas = d.mm(t.pid).vmas
    for th in threads:
        if th["tid"] != tid:
            assert th["sigaltstack"]["flags"] == abi.SS_DISABLE
        # glibc registers all three for every thread; each points into mapped memory.
        head, length = th["robust_list"]
        assert length == abi.ROBUST_LIST_HEAD_SIZE
        assert th["rseq"]["size"] == 32 and th["rseq"]["sig"] == 0x53053053
        for addr in (th["tid_address"], head, th["rseq"]["ptr"]):
            assert any(v["start"] <= addr < v["end"] for v in vmas), hex(addr)
    # The main thread's clear-tid address is glibc's: its struct pthread's tid field,
    # the same in every thread relative to its robust list head.
    offsets = {th["tid_address"] - th["robust_list"][0] for th in threads}
    assert len(offsets) == 1


def test_deleted_file_mapped_and_open(state_target, tmp_path):
    t = state_target
    path, fd, addr, dev, ino = t.set_state["deleted"]
    d = full_dump(t, tmp_path / "d")
    vma = next(v for v in d.mm(t.pid).vmas if v["start"] == int(addr, 16))
    assert vma["deleted"] and vma["path"] == path
    assert vma["stat"]["ino"] == int(ino) and vma["stat"]["dev"] == int(dev)
    assert vma["stat"]["size"] == 4 * 4096
    rec = next(f for f in d.fds(t.pid) if f["fd"] == int(fd))
    assert rec["deleted"] and rec["cloexec"] and rec["target"] == f"{path} (deleted)"
    assert rec["stat"] == vma["stat"]
    assert not any(f["cloexec"] for f in d.fds(t.pid) if f["fd"] <= 2)
    # Identities of what is not deleted: the executable, and every file mapping.
    exe = os.stat(f"/proc/{t.pid}/exe")
    assert d.mm(t.pid).mm["exe_stat"] == {
        "dev": exe.st_dev,
        "ino": exe.st_ino,
        "mode": exe.st_mode,
        "size": exe.st_size,
        "mtime_ns": exe.st_mtime_ns,
    }
    for v in d.mm(t.pid).vmas:
        assert (v["stat"] is not None) == (v["inode"] != 0), v
        if v["stat"]:
            assert v["stat"]["ino"] == v["inode"]


def test_brk_is_exact(spawn, tmp_path):
    t = spawn()
    t.command("brk")  # the first command allocates stdin's buffer; ask again after
    (line,) = t.command("brk")
    program_break = int(line.split()[1], 16)
    d = full_dump(t, tmp_path / "d")
    mm = d.mm(t.pid).mm
    assert mm["brk"] == program_break
    heap = next(v for v in d.mm(t.pid).vmas if v["kind"] == "heap")
    assert mm["start_brk"] <= mm["brk"] <= heap["end"]


def test_mm_records_are_the_maps_the_process_sees(spawn, mapped_file, tmp_path):
    # Leave it stopped: its maps must then be exactly what the dump recorded (the
    # injection's scratch mapping gone, no VMA split or merged by it).
    t = spawn("--state", "--file", str(mapped_file))
    d = full_dump(t, tmp_path / "d", thaw=Thaw.STOPPED)
    wait_for_state(t.pid, "T")
    now = proc.read_maps(t.pid)
    dumped = [tuple(v[name] for name in proc.MapEntry._fields) for v in d.mm(t.pid).vmas]
    assert dumped == [tuple(m) for m in now]
    os.kill(t.pid, signal.SIGCONT)
    t.assert_carries_on()


def test_zombie_leader_state_read_from_another_thread(spawn):
    # A main thread that called pthread_exit is a zombie that cannot run a syscall;
    # process-wide state is read in another thread. (The freezer still treats such a
    # process as exited, and its /proc/PID/maps and mem are empty: this drives the
    # collection directly, on threads stopped here.)
    t = spawn("--state", "--exit-main", "--threads", "2")
    deadline = time.monotonic() + 5
    while proc.read_state(t.pid, t.pid) != "Z":
        assert time.monotonic() < deadline, "main thread did not exit"
        time.sleep(0.01)
    live = proc.list_threads(t.pid)[1:]
    try:
        for tid in live:
            ptrace.seize(tid)
            ptrace.interrupt(tid)
            assert ptrace.wait_stop(tid).kind == "event-stop"
        state = collect.read_injected_state(t.pid, [t.pid, *live])
        process, threads = collect.core_records(t.pid, live, False, state)
    finally:
        for tid in live:
            ptrace.detach(tid)
    assert [th["tid"] for th in threads] == live and sorted(state.threads) == live
    assert process["prctl"]["child_subreaper"] == 1
    usr1 = next(a for a in process["sigactions"] if a["sig"] == signal.SIGUSR1)
    assert usr1["handler"] == int(t.set_state["usr1"][0], 16)
    assert state.brk > 0 and process["shared_siginfo"]
    addr, _ = t.regions["heartbeat"]  # read through a live thread: the leader has no mm
    before = t.read_mem(addr, 8, pid=live[0])
    time.sleep(0.05)
    assert t.read_mem(addr, 8, pid=live[0]) != before


def test_seccomp_filter_does_not_see_the_injected_syscalls(spawn, tmp_path):
    # The target's filter kills it on getitimer, which the dump injects.
    t = spawn("--seccomp", "--state")
    d = full_dump(t, tmp_path / "d")
    process = d.core(t.pid).process
    assert process["seccomp"] == 2 and process["prctl"]["no_new_privs"] == 1
    assert process["itimers"]["real"][0] == 500_000_000
    t.assert_carries_on()
    assert t.alive()


def test_a_process_under_seccomp_comes_back_with_its_filter(spawn, tmp_path):
    """Restore refused a filtering process, and only after the dump had killed it:
    it was lost. Each thread's filters are now dumped (PTRACE_SECCOMP_GET_FILTER)
    and attached again: the same program, and the process runs on under it."""
    import subprocess

    from targetlib import CLI, cli

    t = spawn("--seccomp", "--state")
    ptrace.seize(t.pid)
    try:
        ptrace.interrupt(t.pid)
        ptrace.wait_stop(t.pid)
        filters = ptrace.seccomp_filters(t.pid)
    finally:
        ptrace.detach(t.pid)
    assert len(filters) == 1 and len(filters[0][0]) == 4 * 8  # target.c's four insns
    r = cli("dump", "-t", str(t.pid), "-D", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    t.proc.wait(timeout=10)
    # Not detached: the target dies with its parent (PR_SET_PDEATHSIG, restored).
    restorer = subprocess.Popen([*CLI, "restore", "-D", str(tmp_path / "d")])
    try:
        deadline = time.monotonic() + 30
        while proc_status(t.pid).get("Seccomp_filters") != "1":
            assert restorer.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)  # released by the restorer
        status = proc_status(t.pid)
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        assert status["Seccomp_filters"] == "1"
        ptrace.seize(t.pid)
        try:
            ptrace.interrupt(t.pid)
            ptrace.wait_stop(t.pid)
            assert ptrace.seccomp_filters(t.pid) == filters
        finally:
            ptrace.detach(t.pid)
        t.assert_carries_on()
    finally:
        subprocess.run(["kill", "-9", str(t.pid)])
        restorer.wait(timeout=30)


def test_pre_dump_records_file_identities(spawn, mapped_file, tmp_path):
    t = spawn("--file", str(mapped_file))
    pre_dump(DumpRequest(pid=t.pid, images_dir=tmp_path / "1", tracker="full", progress=False))
    d = Dump.open(tmp_path / "1")
    assert d.version == 2
    mm = d.mm(t.pid)
    mapped = [v for v in mm.vmas if v["path"] == str(mapped_file)]
    assert mapped and all(v["stat"]["ino"] == mapped_file.stat().st_ino for v in mapped)
    assert mm.mm["exe_stat"] is not None
    # Without injection a pre-dump's brk is the [heap] end, as in version 1.
    heap = next(v for v in mm.vmas if v["kind"] == "heap")
    assert mm.mm["brk"] == heap["end"]
