"""restore: a dumped tree comes back to life, byte for byte, and keeps working.

Every test dumps a real workload (tests/targets/lifecycle.c: threads, a child
sharing memory, handlers, an itimer, a thread in a futex and one in nanosleep,
a copy-on-write file mapping, a file written at an offset), kills it, restores
it and checks that it carries on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from memcheck import compare_dump_with_process
from objectslib import dump_and_kill as dump_process_and_kill
from objectslib import program_starter, restore, sigkill
from restorelib import start_lifecycle, wait_stopped
from targetlib import TRACKERS, assert_one_line_error, cli, proc_status, target_binary

from checkpointer.images import Dump


@pytest.fixture
def lifecycle(tmp_path):
    started = []

    def _start(anon_mb: int = 16):
        lc = start_lifecycle(tmp_path, anon_mb)
        started.append(lc)
        return lc

    yield _start
    for lc in started:
        lc.kill()


def dump_and_kill(lc, images, *extra):
    r = cli("dump", "-t", str(lc.pid), "-D", str(images), *extra)
    assert r.returncode == 0, r.stderr
    lc.reap_original()  # our child: its PID is free once reaped
    return lc.status()


def test_restored_tree_keeps_working(lifecycle, tmp_path):
    lc = lifecycle()
    images = tmp_path / "images"
    at_dump = dump_and_kill(lc, images)
    r = cli("restore", "-D", str(images), "-d")
    assert r.returncode == 0, r.stderr
    assert f"root {lc.pid}" in r.stdout
    st = lc.carries_on()
    # Same PIDs, same parent/child shape, same session; nothing ran twice or was lost.
    assert (st["pid"], st["child_pid"]) == (lc.pid, lc.child)
    assert proc_status(lc.child)["PPid"] == str(lc.pid)
    assert os.getsid(lc.pid) == lc.pid and os.getsid(lc.child) == lc.pid
    assert st["counter"] > at_dump["counter"] and st["sum_ok"] == 1
    assert st["mapped"] == at_dump["mapped"]  # copy-on-write pages of the file mapping
    log = lc.log_counters()
    assert log == list(range(1, len(log) + 1)), "the log fd's offset moved"
    # Thread names came back; the handler fires; the futex waiter is released and joined.
    names = sorted(
        open(f"/proc/{lc.pid}/task/{t}/comm").read() for t in os.listdir(f"/proc/{lc.pid}/task")
    )
    assert names == [open(f"/proc/{lc.pid}/comm").read()] * 4 and "python" not in names[0]
    os.kill(lc.pid, signal.SIGUSR1)
    st = lc.wait_for(lambda st: st["usr1"] == 1 and st["joined"] == 1, "SIGUSR1 and the join")
    lc.carries_on()


def test_restored_memory_equals_the_images(lifecycle, tmp_path):
    lc = lifecycle()
    images = tmp_path / "images"
    dump_and_kill(lc, images)
    r = cli("restore", "-D", str(images), "-d", "--leave-stopped")
    assert r.returncode == 0, r.stderr
    for pid in (lc.pid, lc.child):
        wait_stopped(pid)
        assert compare_dump_with_process(images, pid) > 16 << 20 if pid == lc.pid else True
    os.kill(lc.pid, signal.SIGCONT)
    os.kill(lc.child, signal.SIGCONT)
    lc.carries_on()


@pytest.mark.parametrize("tracker", TRACKERS)
def test_restore_the_final_dump_of_a_chain(lifecycle, tmp_path, tracker):
    lc = lifecycle(32)
    for i, parent in ((1, None), (2, "../1")):
        args = ["pre-dump", "-t", str(lc.pid), "-D", str(tmp_path / str(i)), "--tracker", tracker]
        r = cli(*args, *(["--prev-images-dir", parent] if parent else []))
        assert r.returncode == 0, r.stderr
        time.sleep(0.2)  # the workload keeps writing between passes
    final = tmp_path / "3"
    at_dump = dump_and_kill(
        lc, final, "--prev-images-dir", "../2", "--track-mem", "--tracker", tracker
    )
    assert Dump.open(final).inventory["tracker"] == tracker
    r = cli("restore", "-D", str(final), "-d", "--leave-stopped")
    assert r.returncode == 0, r.stderr
    wait_stopped(lc.pid)
    compare_dump_with_process(final, lc.pid)
    compare_dump_with_process(final, lc.child)
    os.kill(lc.child, signal.SIGCONT)
    os.kill(lc.pid, signal.SIGCONT)
    assert lc.carries_on()["counter"] > at_dump["counter"]


@pytest.mark.parametrize("tracker", TRACKERS)
def test_child_forked_between_pre_dumps_is_restored(tmp_path, tracker):
    """A child forked from a tracked process inherits the tracker's userfaultfd:
    the tool's, not the program's. It was dumped as the child's fd (and refused at
    restore); now it is left out and closed in the child at the next pass."""
    with program_starter(tmp_path) as start:
        prog = start(
            """
            ready()
            go()
            child = os.fork()
            if child == 0:
                while True:
                    time.sleep(0.05)
            report("child", child)
            while True:
                time.sleep(0.05)
            """
        )
        images = tmp_path / "images"
        r = cli("pre-dump", "-t", str(prog.pid), "-D", str(images / "1"), "--tracker", tracker)
        assert r.returncode == 0, r.stderr
        prog.go()
        child = int(prog.result("child"))
        r = cli("pre-dump", "-t", str(prog.pid), "-D", str(images / "2"), "--tracker", tracker,
                "--prev-images-dir", "../1")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert len(_uffds(child)) == (tracker == "uffd-wp")  # its own, not its parent's
        r = cli("dump", "-t", str(prog.pid), "-D", str(images / "3"), "--tracker", tracker,
                "--prev-images-dir", "../2")  # fmt: skip
        assert r.returncode == 0, r.stderr
        prog.reap()
        r = cli("restore", "-D", str(images / "3"), "-d")
        assert r.returncode == 0, r.stderr
        assert proc_status(child)["PPid"] == str(prog.pid)
        assert _uffds(prog.pid) == _uffds(child) == []
        os.kill(child, signal.SIGKILL)


def _uffds(pid: int) -> list[int]:
    fds = os.listdir(f"/proc/{pid}/fd")
    return [int(n) for n in fds if os.readlink(f"/proc/{pid}/fd/{n}") == "anon_inode:[userfaultfd]"]


def test_restore_the_output_of_converge(lifecycle, tmp_path):
    lc = lifecycle(32)
    r = cli("converge", "-t", str(lc.pid), "-D", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    lc.reap_original()
    r = cli("restore", "-D", str(tmp_path / "c" / "final"), "-d")
    assert r.returncode == 0, r.stderr
    lc.carries_on()


def test_restore_twice_in_a_row(lifecycle, tmp_path):
    lc = lifecycle()
    dump_and_kill(lc, tmp_path / "a")
    assert cli("restore", "-D", str(tmp_path / "a"), "-d").returncode == 0
    lc.carries_on()
    r = cli("dump", "-t", str(lc.pid), "-D", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    r = cli("restore", "-D", str(tmp_path / "b"), "-d")
    assert r.returncode == 0, r.stderr
    st = lc.carries_on()
    os.kill(lc.pid, signal.SIGUSR1)
    lc.wait_for(lambda st: st["joined"] == 1, "the join after two restores")
    log = lc.log_counters()
    assert log == list(range(1, len(log) + 1)) and st["sum_ok"] == 1


def test_restore_without_detach_waits_for_the_root(lifecycle, tmp_path):
    lc = lifecycle()
    dump_and_kill(lc, tmp_path / "a")
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-m", "checkpointer", "restore", "-D", str(tmp_path / "a")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lc.carries_on()
    assert p.poll() is None  # still waiting for the root
    os.kill(lc.pid, signal.SIGTERM)  # no handler: the root dies of it
    assert p.wait(timeout=10) == 128 + signal.SIGTERM
    os.kill(lc.child, signal.SIGKILL)


PYTHON_SERVER = r"""
import os, sys, time
work = sys.argv[1]
table = {f"key-{i}": i * i for i in range(300_000)}
open(os.path.join(work, "ready"), "w").close()
while True:
    req = os.path.join(work, "request")
    if os.path.exists(req):
        key = open(req).read().strip()
        os.unlink(req)
        answer = f"{len(table)} {sum(table.values())} {table.get(key)}"
        with open(os.path.join(work, "answer.tmp"), "w") as f:
            f.write(answer)
        os.rename(os.path.join(work, "answer.tmp"), os.path.join(work, "answer"))
    time.sleep(0.01)
"""


def ask(work, key: str, timeout: float = 20.0) -> str:
    (work / "request").write_text(key)
    deadline = time.monotonic() + timeout
    while not (work / "answer").exists():
        assert time.monotonic() < deadline, "no answer"
        time.sleep(0.01)
    answer = (work / "answer").read_text()
    (work / "answer").unlink()
    return answer


def test_a_python_interpreter_with_a_large_dict_comes_back(tmp_path):
    import subprocess
    import sys

    work = tmp_path / "py"
    work.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-c", PYTHON_SERVER, str(work)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (work / "ready").exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        expected = f"300000 {sum(i * i for i in range(300_000))} {777 * 777}"
        assert ask(work, "key-777") == expected
        dump_process_and_kill(p.pid, tmp_path / "images", reap=lambda: p.wait(timeout=10))
        restore(tmp_path / "images")
        assert ask(work, "key-777") == expected
        assert ask(work, "key-12") == f"300000 {sum(i * i for i in range(300_000))} 144"
    finally:
        sigkill(p.pid)
        if p.poll() is None:
            p.wait()


def test_credentials_of_an_unprivileged_process_come_back(tmp_path):
    """A workload running as nobody, with supplementary groups and no capabilities:
    restored by root, it has exactly its own credentials again."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from restorelib import LIFECYCLE, MAPPED, Lifecycle
    from targetlib import target_binary

    # pytest's tmp_path lies below a root-only directory: nobody needs its own.
    work = Path(tempfile.mkdtemp(prefix="checkpointer-nobody-"))
    os.chmod(work, 0o777)
    (work / "mapped").write_bytes(MAPPED)
    p = subprocess.Popen(
        [str(target_binary(LIFECYCLE)), str(work), "8"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, user=65534, group=65534, extra_groups=[100, 65534],
    )  # fmt: skip
    lc = Lifecycle(work, p.pid, 0, p)
    try:
        lc.child = lc.wait_for(lambda st: st["counter"] > 20, "the workload")["child_pid"]
        keys = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        before = {k: proc_status(lc.pid)[k] for k in keys}
        assert before["Uid"].split()[0] == "65534"
        dump_and_kill(lc, tmp_path / "images")
        restore(tmp_path / "images")
        lc.carries_on()
        assert {k: proc_status(lc.pid)[k] for k in keys} == before
        for tid in os.listdir(f"/proc/{lc.pid}/task"):
            status = open(f"/proc/{lc.pid}/task/{tid}/status").read()
            assert "Uid:\t65534\t65534\t65534\t65534" in status, tid
    finally:
        lc.kill()
        shutil.rmtree(work, ignore_errors=True)


def test_a_stopped_process_comes_back_stopped_and_pidfile_json(lifecycle, tmp_path):
    import json

    lc = lifecycle()
    os.kill(lc.pid, signal.SIGSTOP)
    wait_stopped(lc.pid)
    dump_and_kill(lc, tmp_path / "a")
    pidfile = tmp_path / "root.pid"
    r = cli("restore", "-D", str(tmp_path / "a"), "-d", "--pidfile", str(pidfile), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["root_pid"] == lc.pid and sorted(out["pids"]) == sorted([lc.pid, lc.child])
    assert pidfile.read_text() == f"{lc.pid}\n"
    wait_stopped(lc.pid)  # as it was dumped
    before = lc.status()["counter"]
    time.sleep(0.3)
    assert lc.status()["counter"] == before
    os.kill(lc.pid, signal.SIGCONT)
    lc.carries_on()


def test_a_job_whose_session_leader_is_in_an_outer_pid_namespace(tmp_path):
    """In a PID namespace (a container, a CI runner) a session or group led from
    an outer namespace reads as id 0: a leader alive outside the tree, joined as
    it is, like a shell's. (Restore took 0 for a gone leader's PID and failed in
    clone3 with EINVAL.)"""
    import subprocess
    import textwrap

    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, subprocess, sys
        cli = [sys.executable, "-m", "checkpointer"]
        quiet = dict(stdout=subprocess.DEVNULL)
        p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        assert os.getsid(p.pid) == 0 and os.getpgid(p.pid) == 0, "not in a new namespace"
        r = subprocess.run(cli + ["dump", "-t", str(p.pid), "-D", "{tmp_path}/i"], **quiet)
        assert r.returncode == 0
        p.wait()
        r = subprocess.run(cli + ["restore", "-D", "{tmp_path}/i", "-d"], **quiet)
        assert r.returncode == 0
        state = open(f"/proc/{{p.pid}}/stat").read().rsplit(")", 1)[1].split()
        os.kill(p.pid, signal.SIGKILL)
        print("restored", state[0], "sid", state[3], "pgid", state[2])
    """)
    )
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "restored S sid 0 pgid 0\n"


@pytest.mark.parametrize("kind, flag", [("net", "--net"), ("uts", "--uts"), ("mnt", "--mount")])
def test_a_process_in_another_namespace_is_refused_at_dump(tmp_path, kind, flag):
    """Namespaces are not dumped: restored in ours, it would see another network,
    host name or file tree. It was dumped (and restored into ours) silently."""
    import subprocess

    p = subprocess.Popen(["unshare", flag, "sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{p.pid}/exe") != "/usr/bin/sleep":  # unshare exec'd it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "i"))
        assert_one_line_error(r, f"process {p.pid} is in another {kind} namespace")
        assert proc_status(p.pid)["State"][0] == "S"  # left running
    finally:
        p.kill()
        p.wait()


def test_scheduling_and_oom_adjustment_come_back(tmp_path):
    """nice, policy, affinity, I/O priority per thread and oom_score_adj per process
    were left at the restorer's (nice 0, SCHED_OTHER, every CPU, no I/O class, 0)."""
    with program_starter(tmp_path) as start:
        prog = start(
            """
            import subprocess, threading
            os.setpriority(os.PRIO_PROCESS, 0, 7)  # this thread's
            subprocess.run(["ionice", "-c", "2", "-n", "1", "-p", str(os.getpid())])
            open("/proc/self/oom_score_adj", "w").write("345")
            def worker():
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
                os.sched_setaffinity(0, {0})
                os.setpriority(os.PRIO_PROCESS, 0, 3)
                subprocess.run(["ionice", "-c", "3", "-p", str(threading.get_native_id())])
                report("worker", threading.get_native_id())
                go()
            threading.Thread(target=worker).start()
            while not (D / "worker").exists():
                time.sleep(0.01)
            ready()
            go()
            """
        )
        worker = int(prog.result("worker"))
        dump_process_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
        restore(tmp_path / "images")
        assert os.getpriority(os.PRIO_PROCESS, prog.pid) == 7
        assert os.getpriority(os.PRIO_PROCESS, worker) == 3
        assert os.sched_getscheduler(worker) == os.SCHED_BATCH
        assert os.sched_getscheduler(prog.pid) == os.SCHED_OTHER
        assert os.sched_getaffinity(worker) == {0}
        assert os.sched_getaffinity(prog.pid) == os.sched_getaffinity(0)
        assert open(f"/proc/{prog.pid}/oom_score_adj").read() == "345\n"
        assert _ionice(prog.pid) == "best-effort: prio 1"  # it was 'none: prio 0'
        assert _ionice(worker) == "idle"


def _ionice(tid: int) -> str:
    return subprocess.run(["ionice", "-p", str(tid)], capture_output=True, text=True).stdout.strip()


def test_posix_timers_come_back(tmp_path):
    """`timeout 4 sleep 1000` holds a POSIX timer (timer_create): restored, it still
    fires when it was due and ends the job. Dropped, the job ran forever."""
    import subprocess

    p = subprocess.Popen(["timeout", "4", "sleep", "1000"], stdin=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    try:
        time.sleep(0.5)
        timers = open(f"/proc/{p.pid}/timers").read()
        assert timers.startswith("ID: 0\nsignal: 14/")
        dump_process_and_kill(p.pid, tmp_path / "images", reap=lambda: p.wait(timeout=10))
        dumped = time.monotonic()
        restore(tmp_path / "images")
        assert open(f"/proc/{p.pid}/timers").read() == timers
        while os.path.exists(f"/proc/{p.pid}") and proc_status(p.pid)["State"][0] != "Z":
            assert time.monotonic() - dumped < 10, "the timer never fired"
            time.sleep(0.05)
        assert time.monotonic() - dumped > 2.5  # it fired when due, not at once
    finally:
        subprocess.run(["pkill", "-9", "-s", str(p.pid)], check=False)


def test_a_posix_timer_aimed_at_a_thread_comes_back(tmp_path):
    """A timer that signals one thread (SIGEV_THREAD_ID; glibc's SIGEV_THREAD timers
    are such, aimed at its helper thread: vim has one) was created before the
    threads existed, and the restore failed with EINVAL from timer_create."""
    with program_starter(tmp_path) as start:
        prog = start(
            """
            import ctypes, signal, threading
            libc = ctypes.CDLL(None, use_errno=True)
            signal.signal(signal.SIGUSR1, lambda *a: report("fired", 1))
            def worker():
                # struct sigevent: sigval, signo, notify, tid (SIGEV_THREAD_ID = 4)
                ev = (ctypes.c_int * 16)(7, 0, signal.SIGUSR1, 4, threading.get_native_id())
                timer = ctypes.c_int()
                assert libc.timer_create(1, ev, ctypes.byref(timer)) == 0
                spec = (ctypes.c_long * 4)(0, 0, 3, 0)  # once, in 3 s
                assert libc.timer_settime(timer, 0, spec, None) == 0
                report("worker", threading.get_native_id())
                while True:
                    time.sleep(0.05)
            threading.Thread(target=worker, daemon=True).start()
            while not (D / "worker").exists():
                time.sleep(0.01)
            ready()
            while True:
                time.sleep(0.05)
            """
        )
        worker = int(prog.result("worker"))
        timers = open(f"/proc/{prog.pid}/timers").read()
        assert f"notify: signal/tid.{worker}\n" in timers
        dump_process_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
        restore(tmp_path / "images")
        assert open(f"/proc/{prog.pid}/timers").read() == timers
        assert prog.result("fired") == b"1"  # delivered when due


def test_a_posix_timer_aimed_at_a_thread_that_exited_comes_back_silent(tmp_path):
    """Its thread is gone, so it signals nobody; timer_create refuses such a thread,
    so it comes back as SIGEV_NONE with its id and time left, not as a failed
    restore."""
    with program_starter(tmp_path) as start:
        prog = start(
            """
            import ctypes, signal, threading
            libc = ctypes.CDLL(None, use_errno=True)
            def worker():
                ev = (ctypes.c_int * 16)(7, 0, signal.SIGUSR1, 4, threading.get_native_id())
                timer = ctypes.c_int()
                assert libc.timer_create(1, ev, ctypes.byref(timer)) == 0
                spec = (ctypes.c_long * 4)(0, 0, 100, 0)
                assert libc.timer_settime(timer, 0, spec, None) == 0
            t = threading.Thread(target=worker)
            t.start()
            t.join()
            ready()
            go()
            report("alive", 1)
            """
        )
        assert "notify: signal/tid." in open(f"/proc/{prog.pid}/timers").read()
        dump_process_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
        restore(tmp_path / "images")
        assert open(f"/proc/{prog.pid}/timers").read().startswith("ID: 0\nsignal: 10/")
        assert "notify: none" in open(f"/proc/{prog.pid}/timers").read()
        prog.go()
        assert prog.result("alive") == b"1"


def wait_reaped(pid: int, timeout: float = 10) -> None:
    """Until init has reaped pid (an orphan: here init may take seconds)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"process {pid} was not reaped"
        time.sleep(0.02)


def test_a_session_whose_leader_exited_but_lives_on_outside_the_tree(tmp_path):
    """Its leader exited, but another process outside the tree is still in the
    session: the id is in use, so no helper can take it (clone3 gave EEXIST, as for
    a CI job whose shell had exited); the tree joins the restorer's session."""
    import subprocess

    sh = subprocess.run(
        ["setsid", "sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!; "
         "sleep 1001 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    dumped, other = (int(x) for x in sh.stdout.split())
    try:
        sid = os.getsid(dumped)
        assert os.getsid(other) == sid and not os.path.exists(f"/proc/{sid}")
        r = cli("dump", "-t", str(dumped), "-D", str(tmp_path / "i"))
        assert r.returncode == 0, r.stderr
        wait_reaped(dumped)
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert r.returncode == 0, r.stderr
        assert os.getsid(dumped) == os.getsid(0)
        assert proc_status(dumped)["State"].startswith("S")
    finally:
        for pid in (dumped, other):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


DAEMON_WITH_WORKERS = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():  # the session's leader exits: the rest is a daemon
    os._exit(0)
def child(body):
    pid = os.fork()
    if pid == 0:
        body()
        while True:
            time.sleep(100)
    return pid
worker = child(lambda: None)  # in the daemon's session and group
def own_group():
    os.setpgid(0, 0)
    child(lambda: None)  # in that group
group = child(own_group)
time.sleep(0.3)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker} {group}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(100)
"""


def test_a_daemon_whose_children_share_the_session_of_its_exited_leader(tmp_path):
    """A double-forked daemon with workers: its children are in the session (and
    the group) of a leader that exited. Only the first process of that session is
    cloned through a helper with the leader's PID; the others join the session as
    they did (restore tried a second helper with the same PID: "PID N is taken";
    lighttpd with two workers, dnsmasq with a TCP child)."""
    said = tmp_path / "pids"
    subprocess.run(
        [sys.executable, "-c", DAEMON_WITH_WORKERS, str(said)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=30,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not said.exists():
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.02)
    daemon, worker, group = (int(x) for x in said.read_text().split())
    grandchild = int(open(f"/proc/{group}/task/{group}/children").read().split()[0])
    pids = (daemon, worker, group, grandchild)
    ids = {pid: (os.getsid(pid), os.getpgid(pid)) for pid in pids}
    leader = ids[daemon][0]
    try:
        wait_reaped(leader)
        assert ids[worker] == (leader, leader) and ids[group] == ids[grandchild] == (leader, group)
        r = cli("dump", "-t", str(daemon), "-D", str(tmp_path / "i"))
        assert r.returncode == 0, r.stderr
        wait_reaped(daemon)
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert r.returncode == 0, r.stderr
        assert {pid: (os.getsid(pid), os.getpgid(pid)) for pid in pids} == ids
        assert not os.path.exists(f"/proc/{leader}")  # the helper is gone
        for pid in pids:
            assert proc_status(pid)["State"].startswith("S")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_job_in_the_callers_session_without_a_terminal(tmp_path):
    """Started from our session (its leader is not in the tree) but holding no
    terminal: no --shell-job needed; it comes back in the restorer's session."""
    import subprocess

    p = subprocess.Popen(
        ["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert os.getsid(p.pid) == os.getsid(0) != p.pid
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "i"))
        assert r.returncode == 0, r.stderr
        p.wait(timeout=10)
        r = cli("restore", "-D", str(tmp_path / "i"), "-d")
        assert r.returncode == 0, r.stderr
        assert os.getsid(p.pid) == os.getsid(0)
        assert proc_status(p.pid)["State"].startswith("S")
    finally:
        sigkill(p.pid)


@pytest.mark.parametrize(
    "flag, what",
    [("vm", "memory"), ("files", "file descriptor table"), ("fs", "working directory")],
)
def test_processes_sharing_kernel_state_are_refused_at_dump(tmp_path, flag, what):
    """Two processes (not threads) made by clone() with CLONE_VM, CLONE_FILES or
    CLONE_FS share one memory, fd table or cwd/umask; restore makes each its own,
    so writes one makes would no longer reach the other. Such a tree was dumped
    and restored silently."""
    import subprocess

    binary = target_binary(Path(__file__).parent / "targets" / "sharing.c")
    p = subprocess.Popen([str(binary), flag], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    child = int(p.stdout.readline())
    try:
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "i"))
        pair = f"processes {min(p.pid, child)} and {max(p.pid, child)} share"
        assert_one_line_error(r, pair, what)
        assert not (tmp_path / "i").exists()
        for pid in (p.pid, child):  # left running (the child ticks: R or S)
            assert proc_status(pid)["State"][0] in "RS"
            assert proc_status(pid)["TracerPid"] == "0"
    finally:
        sigkill(child)
        p.kill()
        p.wait()


def test_a_chain_whose_pages_interleave_is_restored_decompressing_each_frame_once(
    tmp_path, monkeypatch
):
    """Every other page written after a pre-dump: the final dump holds the odd
    pages, its parent the even ones. Restore wrote in address order and
    decompressed a frame again each time the source switched, once per page here
    (a redis converge chain: 3,323 frame decompressions, 0.56 s of a 0.85 s
    restore). The memory must come back exactly, with each frame unpacked once."""
    from checkpointer.restore import RestoreRequest, pagefeed
    from checkpointer.restore import restore as restore_tree

    with program_starter(tmp_path) as start:
        prog = start(
            """
            import hashlib
            page = os.sysconf("SC_PAGE_SIZE")
            buf = bytearray(os.urandom(8 << 20))
            ready()
            go()
            for off in range(page, len(buf), 2 * page):
                buf[off] ^= 0xFF
            report("sum", hashlib.sha256(buf).hexdigest())
            while not (D / "again").exists():
                time.sleep(0.01)
            report("after", hashlib.sha256(buf).hexdigest())
            while True:
                time.sleep(0.05)
            """
        )
        images = tmp_path / "images"
        r = cli("pre-dump", "-t", str(prog.pid), "-D", str(images / "1"))
        assert r.returncode == 0, r.stderr
        prog.go()
        before = prog.result("sum")
        dump_process_and_kill(prog.pid, images / "2", "--prev-images-dir", "../1",
                              reap=prog.reap)  # fmt: skip
        frames = 0
        for d in Dump.open(str(images / "2")).chain():
            frames += d.pagemap(f"pid-{prog.pid}").head["nr_frames"]
        unpacked = []
        real = pagefeed._decompress
        monkeypatch.setattr(
            pagefeed, "_decompress", lambda pm, index: unpacked.append(index) or real(pm, index)
        )
        restore_tree(RestoreRequest(images / "2"))
        (prog.dir / "again").touch()
        assert prog.result("after") == before
        assert 0 < len(unpacked) <= frames


def test_more_shared_objects_than_the_restorer_may_hold_open(tmp_path):
    """The restorer held every shared object's fd (and its pages file) to the end,
    and failed with EMFILE past its open-file limit (20,000 Python mmaps, each
    MAP_SHARED, on a machine whose hard limit was 20,000). Here: 300 objects and a
    restorer limited to 200 fds."""
    import resource

    with program_starter(tmp_path) as start:
        prog = start(
            """
            import mmap, resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))  # as the restorer's
            maps = [mmap.mmap(-1, 4096) for _ in range(300)]  # MAP_SHARED by default
            for i, m in enumerate(maps):
                m[:4] = i.to_bytes(4, "little")
            ready()
            go()
            report("values", all(int.from_bytes(m[:4], "little") == i for i, m in enumerate(maps)))
            """
        )
        dump_process_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)

        def limited() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

        r = cli("restore", "-D", str(tmp_path / "images"), "-d", preexec_fn=limited)
        assert r.returncode == 0, r.stderr
        prog.go()
        assert prog.result("values") == b"True"


def test_a_process_with_thousands_of_mappings_comes_back_mapping_for_mapping(tmp_path):
    """Each mapping was made by its own injected mmap (two ptrace stops each): 30,000
    mappings took 2.5 s of a restore. They are now made a batch at a time; here 1,500
    alternating-protection pages (six batches of the restore's scratch area) and 40
    private mappings of one file, each at its offset, must come back exactly."""
    with program_starter(tmp_path) as start:
        prog = start(
            """
            import ctypes, mmap
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
            N, P = 1500, mmap.PAGESIZE
            base = libc.mmap(None, N * P, 3, 0x22, -1, 0)  # private anonymous
            for i in range(N):
                ctypes.c_uint32.from_address(base + i * P).value = i
                if i % 2:
                    libc.mprotect(ctypes.c_void_p(base + i * P), P, 1)
            path = D / "data"
            path.write_bytes(b"".join(i.to_bytes(4, "little") * (P // 4) for i in range(40)))
            with open(path, "rb") as f:
                files = [mmap.mmap(f.fileno(), P, mmap.MAP_PRIVATE, mmap.PROT_READ,
                                   offset=i * P) for i in range(40)]
            (D / "base").write_text(str(base))
            ready()
            go()
            ok = all(ctypes.c_uint32.from_address(base + i * P).value == i for i in range(N))
            ok = ok and all(m[:4] == i.to_bytes(4, "little") for i, m in enumerate(files))
            report("values", ok)
            """
        )
        pid = prog.pid
        before = Path(f"/proc/{pid}/maps").read_text().splitlines()
        assert len(before) > 1500
        dump_process_and_kill(pid, tmp_path / "images", reap=prog.reap)
        r = cli("restore", "-D", str(tmp_path / "images"), "-d", "--leave-stopped")
        assert r.returncode == 0, r.stderr
        after = Path(f"/proc/{pid}/maps").read_text().splitlines()

        assert _merged_maps(after) == _merged_maps(before)
        os.kill(pid, signal.SIGCONT)
        prog.go()
        assert prog.result("values") == b"True"


def _merged_maps(lines: list[str]) -> list[tuple]:
    """maps lines as (start, end, perms, offset, path), but for the kernel's areas,
    neighbours the kernel may merge once they are mapped alike taken as one: a
    library's relocated page, made read-only after its relocation, and the
    read-only part next to it, are two VMAs before the dump (one holds a private
    copy), and may be one after a restore (CRIU's the same)."""
    out: list[tuple] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        perms, offset, path = fields[1], int(fields[2], 16), fields[5] if len(fields) > 5 else ""
        if path.startswith("[v"):
            continue
        last = out[-1] if out else None
        if (
            last
            and last[1] == start
            and last[2] == perms
            and last[4] == path
            and (not path or last[3] + (last[1] - last[0]) == offset)
        ):
            out[-1] = (last[0], end, perms, last[3], path)
        else:
            out.append((start, end, perms, offset, path))
    return out


def _huge_kb(pid: int, start: int) -> int:
    """AnonHugePages (kB) of the VMA at `start`."""
    inside = False
    for line in open(f"/proc/{pid}/smaps"):
        if "-" in line.split(" ", 1)[0] and not line.startswith(("Anon", "Size")):
            inside = int(line.split("-", 1)[0], 16) == start
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(
    "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read(),
    reason="transparent huge pages are off on this kernel",
)
def test_memory_advised_huge_comes_back_in_huge_pages(tmp_path):
    """MADV_HUGEPAGE memory backed by transparent huge pages came back in 4 KiB
    pages: the pages were written before the advice was given again, so the
    system's THP setting chose their size (and a MADV_NOHUGEPAGE region came back
    in huge pages under THP "always")."""
    code = """
        import mmap
        m = mmap.mmap(-1, 64 << 20, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        for off in range(0, 64 << 20, 4096):
            m[off] = 1
        import ctypes
        report("start", ctypes.addressof(ctypes.c_char.from_buffer(m)))
        ready()
        while True:
            time.sleep(1)
    """
    with program_starter(tmp_path) as start:
        prog = start(code)
        region = int(prog.result("start"))
        if _huge_kb(prog.pid, region) < 32 << 10:
            pytest.skip("no transparent huge pages to be had for the region here")
        dump_process_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
        restore(tmp_path / "images")
        assert _huge_kb(prog.pid, region) >= 32 << 10


def test_interrupting_a_restore_that_waits_says_the_tree_runs_on(tmp_path):
    """A restore that is not detached waits for its root; ^C (or SIGTERM) then ends
    the wait, not the tree: the line says so. It said "interrupted; nothing was
    left stopped or half-written", as if the restore had been undone."""
    from targetlib import CLI

    p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "i"))
        assert r.returncode == 0, r.stderr
        p.wait(timeout=10)
        restorer = subprocess.Popen(
            [*CLI, "restore", "-D", str(tmp_path / "i")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert restorer.stdout.readline().startswith("restored 1 process(es)")
        restorer.send_signal(signal.SIGINT)
        assert restorer.wait(timeout=10) == 1
        assert restorer.stderr.read() == (f"checkpointer: interrupted; process {p.pid} runs on\n")
        assert proc_status(p.pid)["State"].startswith("S")
    finally:
        sigkill(p.pid)
