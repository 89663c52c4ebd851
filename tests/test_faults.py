"""Fault injection on real targets and a real kernel: whatever dies or fails
mid-way, the target is released (running, untraced), nothing half-written is
ever taken for a dump, and the next pass knows whether it may build on the last.
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
from targetlib import CLI, assert_one_line_error, cli, proc_status, wait_for_state

from checkpointer.images import Dump

TIMEOUT = 120  # generous: only there so that a hang fails instead of blocking the suite

UFFD_AND_FULL = [pytest.param("uffd-wp", marks=pytest.mark.uffd_wp), "full"]


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def temp_dirs(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


def wait_until_copying(final: Path, p: subprocess.Popen, timeout: float = 60) -> Path:
    """Wait until the run writing `final` has started writing a process's pages into
    its hidden temp dir: the target is frozen (dump), or being read (pre-dump, a
    snapshot's copy) right now. (Whole files, as the target's deleted one, are
    written before, in a snapshot's window.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in temp_dirs(final):
            try:
                if any(
                    f.name.startswith("pages-pid-") and f.stat().st_size > 0 for f in tmp.iterdir()
                ):
                    return tmp
            except FileNotFoundError:
                pass
        if p.poll() is not None:
            raise AssertionError(f"the run ended before copying: {p.communicate()}")
        time.sleep(0.002)
    p.kill()
    raise AssertionError("the run never started copying pages")


def assert_released(pid: int, timeout: float = 5.0) -> None:
    """Every thread of pid runs (not stopped, not in a tracing stop) and has no tracer."""
    deadline = time.monotonic() + timeout
    while True:
        bad = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            st = proc_status(int(tid))
            if st and (st["State"][0] in "tT" or st["TracerPid"] != "0"):
                bad[tid] = (st["State"], st["TracerPid"])
        if not bad:
            return
        assert time.monotonic() < deadline, f"threads of {pid} not released: {bad}"
        time.sleep(0.01)


def assert_not_a_dump(path: Path) -> None:
    """Neither verify nor show accepts path as a dump."""
    for cmd in ("verify", "show"):
        r = cli(cmd, str(path))
        assert r.returncode != 0, (cmd, path, r.stdout)
        assert "Traceback" not in r.stderr


# -- the target dies --------------------------------------------------------------


@pytest.mark.parametrize("command", ["dump", "pre-dump"])
def test_target_killed_mid_pass(spawn, tmp_path, command):
    """The root of a two-process tree is SIGKILLed while its pages are being copied."""
    t = spawn("--anon-mb", "512", "--fork")
    final = tmp_path / "d"
    # A snapshot's copy reads the children, which outlive a target killed after the
    # thaw: here the copy is frozen.
    extra = ["--leave-running", "--no-snapshot"] if command == "dump" else ["--tracker", "full"]
    p = start_cli(command, "-t", str(t.pid), "-D", str(final), *extra)
    wait_until_copying(final, p)
    t.proc.kill()
    t.proc.wait(timeout=10)
    r = finish(p)
    assert_one_line_error(r, str(t.pid), "exited")
    assert not final.exists() and not temp_dirs(final)
    # The child outlives its parent: it must not stay stopped or traced.
    assert_released(t.child)


# -- the tool dies ------------------------------------------------------------------


@pytest.mark.parametrize("tracker", UFFD_AND_FULL)
@pytest.mark.parametrize("command", ["dump", "pre-dump"])
def test_tool_sigkilled_mid_pass(spawn, tmp_path, command, tracker):
    t = spawn("--anon-mb", "128", "--threads", "4")
    r = cli("pre-dump", "-t", str(t.pid), "-D", str(tmp_path / "1"), "--tracker", tracker)
    assert r.returncode == 0, r.stderr
    t.command("write 0 1000")
    final = tmp_path / "2"
    extra = ["--leave-running", "--track-mem"] if command == "dump" else []
    p = start_cli(
        command,
        "-t",
        str(t.pid),
        "-D",
        str(final),
        "--prev-images-dir",
        "../1",
        "--tracker",
        tracker,
        *extra,
    )
    tmp = wait_until_copying(final, p)
    p.kill()
    p.wait(timeout=10)

    assert_released(t.pid)
    t.assert_carries_on()
    assert not final.exists()
    # A hidden temp dir may remain after SIGKILL; it is never a dump nor a parent.
    if tmp.exists():
        assert_not_a_dump(tmp)
        r = cli(
            "pre-dump",
            "-t",
            str(t.pid),
            "-D",
            str(tmp_path / "x"),
            "--prev-images-dir",
            f"../{tmp.name}",
            "--tracker",
            tracker,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "x").exists()

    # The next pass on the last good dump must not trust tracking the dead run reset.
    r = cli(
        "pre-dump",
        "-t",
        str(t.pid),
        "-D",
        str(tmp_path / "3"),
        "--prev-images-dir",
        "../1",
        "--tracker",
        tracker,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    if tracker == "full":
        assert res["incremental"]  # content comparison needs no kernel state
    else:
        assert not res["incremental"] and "full pass" in res["full_pass_reason"]
    t.command("write 500 100")
    r = cli(
        "dump",
        "-t",
        str(t.pid),
        "-D",
        str(tmp_path / "4"),
        "--prev-images-dir",
        "../3",
        "--tracker",
        tracker,
        "--track-mem",
        "--leave-stopped",
    )
    assert r.returncode == 0, r.stderr
    assert wait_for_state(t.pid, "T").startswith("T")
    compare_dump_with_process(tmp_path / "4", t.pid)


@pytest.mark.parametrize(
    "sig, mode",
    [
        (signal.SIGINT, "--leave-running"),
        (signal.SIGTERM, "--leave-running"),
        (signal.SIGINT, "--leave-stopped"),
        (signal.SIGTERM, None),
        (signal.SIGHUP, "--leave-running"),
        (signal.SIGHUP, None),
    ],
)
def test_sigint_sigterm_mid_dump(spawn, tmp_path, sig, mode):
    """An interrupted dump saved nothing, so the target is released running whatever
    was asked for afterwards (in particular it is not killed). SIGHUP (its terminal
    or ssh session closed) is a SIGTERM: it killed the tool, leaving its temp dir."""
    t = spawn("--anon-mb", "512", "--fork")
    final = tmp_path / "d"
    p = start_cli("dump", "-t", str(t.pid), "-D", str(final), *([mode] if mode else []))
    wait_until_copying(final, p)
    p.send_signal(sig)
    r = finish(p)
    what = "interrupted" if sig == signal.SIGINT else "terminated"
    assert_one_line_error(r, what)
    assert not final.exists() and not temp_dirs(final)
    assert t.alive()
    assert_released(t.pid)
    assert_released(t.child)
    t.assert_carries_on()


GOLDEN = Path(__file__).parent.parent / "images" / "golden" / "chain" / "3"


@pytest.mark.parametrize(
    "command", [["show", str(GOLDEN)], ["restore", "-D", "/nonexistent"]], ids=["show", "restore"]
)
def test_ctrl_c_while_the_command_starts_is_one_line(command):
    """^C while the command is still starting (importing its modules, parsing its
    arguments) ended it with a Python traceback or click's "Aborted!". Nothing has
    been touched then: one line, exit 1; or, if it came too late, the command's
    own result. The ^C is sent 0-100 ms after the command caught SIGINT: started
    with SIGINT ignored, the interpreter installs no handler of its own, so the
    first one /proc shows caught is checkpointer's (before that the interpreter
    itself starts, where a ^C is Python's to report)."""
    for i in range(40):
        p = subprocess.Popen([*CLI, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=_ignore_sigint)  # fmt: skip
        deadline = time.monotonic() + 10
        while not _catches_sigint(p.pid):
            assert p.poll() is None, "the command started and ended without catching SIGINT"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.1 * i / 40)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=30)[1]
        assert "Traceback" not in err and "Aborted" not in err, err
        assert err == "" or (err.count("\n") == 1 and err.startswith("checkpointer: ")), err
        # (-SIGINT: it came as the interpreter exited, its handlers gone)
        assert p.returncode in (0, 1, -signal.SIGINT), (p.returncode, err)
        assert p.returncode != 0 or err == "", err
        assert p.returncode != 1 or err != "", err


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _catches_sigint(pid: int) -> bool:
    caught = int(proc_status(pid).get("SigCgt", "0"), 16)
    return bool(caught & (1 << (signal.SIGINT - 1)))


# -- the tree changes while it is frozen -----------------------------------------------


def test_thread_storm(spawn, tmp_path):
    t = spawn("--storm", "--threads", "8")
    for i in range(3):
        final = tmp_path / f"d{i}"
        r = cli("dump", "-t", str(t.pid), "-D", str(final), "--leave-stopped", timeout=60)
        if r.returncode == 0:
            assert wait_for_state(t.pid, "T").startswith("T")
            compare_dump_with_process(final, t.pid)
            os.kill(t.pid, signal.SIGCONT)
        else:
            assert_one_line_error(r, "keeps changing")
            assert not final.exists() and not temp_dirs(final)
        assert_released(t.pid)
        t.assert_carries_on()


def test_forking_tree(tmp_path):
    """A shell forking a short-lived child continuously: each dump either freezes a
    consistent tree or says it keeps changing; never hangs, never leaves a stop."""
    sh = subprocess.Popen(["bash", "-c", "while :; do (:); done"], start_new_session=True)
    try:
        time.sleep(0.2)
        for i in range(3):
            final = tmp_path / f"d{i}"
            r = cli("dump", "-t", str(sh.pid), "-D", str(final), "--leave-stopped", timeout=60)
            if r.returncode == 0:
                assert wait_for_state(sh.pid, "T").startswith("T")
                compare_dump_with_process(final, sh.pid)
                for pid in Dump.open(final).inventory["pids"]:
                    if pid != sh.pid and proc_status(pid).get("State", "Z")[0] != "Z":
                        compare_dump_with_process(final, pid)
                        os.kill(pid, signal.SIGCONT)
                os.kill(sh.pid, signal.SIGCONT)
            else:
                assert_one_line_error(r, "keeps changing")
                assert not final.exists() and not temp_dirs(final)
            assert_released(sh.pid)
    finally:
        sh.kill()
        sh.wait()


# -- resources and contention ------------------------------------------------------------


@pytest.mark.parametrize("command", ["dump", "pre-dump"])
def test_disk_full_cli(spawn, tmp_path, command):
    t = spawn("--anon-mb", "16")
    chain = tmp_path / "chain"
    chain.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(chain)], check=True)
    try:
        r = cli("pre-dump", "-t", str(t.pid), "-D", str(chain / "1"))
        assert r.returncode == 0, r.stderr
        free = os.statvfs(chain).f_bavail * os.statvfs(chain).f_frsize
        with open(chain / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - (32 << 10))
        t.command("write 0 2000")
        extra = ["--leave-running", "--track-mem"] if command == "dump" else []
        r = cli(
            command, "-t", str(t.pid), "-D", str(chain / "2"), "--prev-images-dir", "../1", *extra
        )
        assert_one_line_error(r, f"{chain / '2'}: No space left on device")  # it named nothing
        assert sorted(p.name for p in chain.iterdir()) == ["1", "filler"]
        assert_released(t.pid)
        t.assert_carries_on()
        (chain / "filler").unlink()
        # Tracking state was not lost: the next pass on the last good dump is correct.
        r = cli(
            "pre-dump",
            "-t",
            str(t.pid),
            "-D",
            str(chain / "3"),
            "--prev-images-dir",
            "../1",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        t.command("write 100 10")
        r = cli(
            "dump",
            "-t",
            str(t.pid),
            "-D",
            str(chain / "4"),
            "--prev-images-dir",
            "../3",
            "--track-mem",
            "--leave-stopped",
        )
        assert r.returncode == 0, r.stderr
        compare_dump_with_process(chain / "4", t.pid)
    finally:
        subprocess.run(["umount", "-l", str(chain)], check=True)


@pytest.mark.uffd_wp
def test_first_pass_failing_leaves_no_second_userfaultfd(spawn, tmp_path):
    """A first pre-dump that set up tracking in the target and then failed (disk
    full) did not save where: the next pass put a second userfaultfd into the
    target, and the first, still registered, made every later pass copy those
    regions whole ("write-protected by its own userfaultfd")."""
    t = spawn("--anon-mb", "16")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        r = cli("pre-dump", "-t", str(t.pid), "-D", str(small / "1"), "--tracker", "uffd-wp")
        assert_one_line_error(r, "No space left")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    for i in (1, 2):
        parent = ["--prev-images-dir", f"../{i - 1}"] if i > 1 else []
        r = cli("pre-dump", "-t", str(t.pid), "-D", str(tmp_path / str(i)), "--tracker",
                "uffd-wp", "-v", *parent)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert "write-protected by its own userfaultfd" not in r.stderr
    fds = os.listdir(f"/proc/{t.pid}/fd")
    links = [os.readlink(f"/proc/{t.pid}/fd/{n}") for n in fds]
    assert links.count("anon_inode:[userfaultfd]") == 1


def test_two_runs_on_one_target(spawn, tmp_path):
    # 2 GiB: the first pre-dump must still be copying when the other two start,
    # even on a loaded machine (512 MiB was sometimes done before them).
    t = spawn("--anon-mb", "2048")
    first = start_cli("pre-dump", "-t", str(t.pid), "-D", str(tmp_path / "a"))
    wait_until_copying(tmp_path / "a", first)
    for args in (
        ["pre-dump", "-D", str(tmp_path / "b")],
        ["dump", "-D", str(tmp_path / "c"), "--leave-running"],
    ):
        r = cli(*args, "-t", str(t.pid))
        assert_one_line_error(r, f"pid {first.pid}", str(t.pid))
    assert finish(first).returncode == 0
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert cli("verify", str(tmp_path / "a")).returncode == 0
    assert_released(t.pid)


def test_already_traced_by_strace(spawn, tmp_path):
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    t = spawn()
    tracer = subprocess.Popen(
        ["strace", "-f", "-o", os.devnull, "-p", str(t.pid)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while proc_status(t.pid)["TracerPid"] != str(tracer.pid):
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        r = cli("dump", "-t", str(t.pid), "-D", str(tmp_path / "d"), "--leave-running")
        assert_one_line_error(r, f"PID {tracer.pid}", "strace")
        assert not (tmp_path / "d").exists() and not temp_dirs(tmp_path / "d")
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    assert_released(t.pid)
    t.assert_carries_on()


def userfaultfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
        except FileNotFoundError:
            continue  # closed meanwhile (this test's own process opens and closes)
    return count


@pytest.mark.uffd_wp
@pytest.mark.parametrize("race", [False, True])
def test_pre_dump_refused_for_a_traced_child_tracks_nobody(
    spawn, tmp_path, private_state_dir, monkeypatch, race
):
    """A uffd-wp pre-dump (which does not freeze) refused because a child of the
    tree is traced by strace: it had already given the root a userfaultfd and saved
    tracking state for it (failed before the fix: the root held 1 userfaultfd).
    `race`: strace attached only after the pass checked that every member can be
    seized (the check skipped, in this process): what the pass had set up is taken
    out again (failed before that part of the fix the same way)."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    t = spawn("--fork")
    assert t.child
    tracer = subprocess.Popen(
        ["strace", "-o", os.devnull, "-p", str(t.child)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while proc_status(t.child)["TracerPid"] != str(tracer.pid):
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        if race:
            from checkpointer.dump import DumpRequest, pre_dump
            from checkpointer.errors import TargetError
            from checkpointer.kernel import ptrace

            monkeypatch.setattr(ptrace, "check_seizable", lambda pid, tids: None)
            req = DumpRequest(t.pid, tmp_path / "p", tracker="uffd-wp", progress=False)
            with pytest.raises(TargetError, match=f"already traced by PID {tracer.pid}"):
                pre_dump(req)
        else:
            r = cli("pre-dump", "-t", str(t.pid), "-D", str(tmp_path / "p"), "--tracker", "uffd-wp")
            assert_one_line_error(r, f"PID {tracer.pid}", "strace", str(t.child))
        assert userfaultfds(t.pid) == 0
        assert not list(private_state_dir.glob("*.json"))
        assert not (tmp_path / "p").exists() and not temp_dirs(tmp_path / "p")
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    assert userfaultfds(t.child) == 0
    assert_released(t.pid)
    t.assert_carries_on()


@pytest.mark.uffd_wp
def test_pre_dump_of_a_tree_holding_the_tool_is_refused(tmp_path, private_state_dir):
    """`pre-dump -t $$` from a shell: the tool is in the tree it would track. It
    gave the shell (here: this test's process) a userfaultfd, then failed to seize
    itself with "permission denied" (failed before the fix: this process held a
    userfaultfd afterwards)."""
    me = os.getpid()
    before = userfaultfds(me)
    r = cli("pre-dump", "-t", str(me), "-D", str(tmp_path / "p"), "--tracker", "uffd-wp")
    assert_one_line_error(r, "includes checkpointer itself", str(me))
    assert userfaultfds(me) == before
    assert not list(private_state_dir.glob("*.json"))
    assert not (tmp_path / "p").exists()
    assert proc_status(me)["TracerPid"] == "0"


@pytest.mark.slow
def test_many_threads_and_gigabytes_in_bounded_memory(spawn, tmp_path):
    t = spawn("--threads", "300", "--anon-mb", "2048")
    final = tmp_path / "d"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        p = subprocess.Popen(
            [*CLI, "dump", "-t", str(t.pid), "-D", str(final), "--leave-stopped"],
            stdout=out,
            stderr=err,
            env=dict(os.environ),
        )
        # VmHWM of the tool's own mm, polled until it exits (hiwater only grows).
        # Not ru_maxrss: exec carries the forking parent's (pytest's) peak into it.
        peak_kib = 0
        while p.poll() is None:
            status = proc_status(p.pid).get("VmHWM", "0 kB")
            peak_kib = max(peak_kib, int(status.split()[0]))
            time.sleep(0.02)
    assert p.returncode == 0, (tmp_path / "err").read_text()
    assert wait_for_state(t.pid, "T").startswith("T")
    assert len(os.listdir(f"/proc/{t.pid}/task")) >= 300
    assert compare_dump_with_process(final, t.pid) > 2 << 30
    peak_mib = peak_kib / 1024
    assert 0 < peak_mib < 200, f"tool peak RSS {peak_mib:.0f} MiB"


def test_running_out_of_fds_leaves_no_temp_dir(spawn, tmp_path):
    """A dump that ran out of file descriptors (EMFILE) left its temp dir behind:
    removing a directory tree needs fds to list it. Tried at limits around where
    the dump runs out of them; it fails in one line or succeeds, with nothing left."""
    import resource

    t = spawn("--anon-mb", "4")
    failed = 0
    for limit in range(5, 15):
        final = tmp_path / f"d{limit}"

        def limited(n=limit) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

        r = subprocess.run([*CLI, "dump", "-t", str(t.pid), "-D", str(final), "--leave-running"],
                           capture_output=True, text=True, timeout=120,
                           preexec_fn=limited)  # fmt: skip
        if r.returncode:
            failed += 1
            assert_one_line_error(r)
            assert not final.exists()
        assert not temp_dirs(final), (limit, r.stderr)
        assert_released(t.pid)
    assert failed  # some limit was too low
    t.assert_carries_on()
