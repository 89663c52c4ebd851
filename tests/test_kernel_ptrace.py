"""ptrace layer against real processes: seize/interrupt/detach, group-stop, regs, injection."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from checkpointer.errors import TargetError
from checkpointer.kernel import proc, ptrace
from checkpointer.kernel.syscalls import NR_close, NR_getpid

# A tiny target whose blocking syscalls and registers the tests control:
#   kt spin  [THREADS]        r12 = 0x1122334455667788, r13 counts up forever
#   kt sleep [THREADS] [MS]   nanosleep(MS) in a loop, printing "SLEPT ret errno elapsed_ms"
#   kt read  [THREADS]        read(0) in a loop, printing "READ n errno data"
#   kt pause [THREADS]
KT_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static void *sleeper(void *a) { (void)a; for (;;) usleep(1000); return NULL; }
static long ms_since(struct timespec *t0) {
    struct timespec t1; clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *mode = argv[1];
    int nthreads = argc > 2 ? atoi(argv[2]) : 0;
    long ms = argc > 3 ? atol(argv[3]) : 300;
    pthread_t t;
    for (int i = 0; i < nthreads; i++) pthread_create(&t, NULL, sleeper, NULL);
    printf("READY %d\n", getpid());
    if (!strcmp(mode, "spin"))
        __asm__ volatile("movabs $0x1122334455667788, %%r12\n\txor %%r13, %%r13\n"
                 "1:\n\tinc %%r13\n\tjmp 1b\n" ::: "r12", "r13");
    if (!strcmp(mode, "sleep"))
        for (;;) {
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000}, t0;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            int r = nanosleep(&ts, NULL), e = r ? errno : 0;
            printf("SLEPT %d %d %ld\n", r, e, ms_since(&t0));
        }
    if (!strcmp(mode, "read"))
        for (;;) {
            char b[64];
            ssize_t n = read(0, b, sizeof b);
            int e = n < 0 ? errno : 0;
            printf("READ %zd %d %.*s\n", n, e, n > 0 ? (int)n : 0, b);
            if (n == 0) return 0;
        }
    for (;;) pause();
}
"""


class Kt:
    """A running kt process; killed at teardown."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), line
        self.pid = self.proc.pid

    def line(self) -> str:
        assert self.proc.stdout
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def kt_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kt")
    (d / "kt.c").write_text(KT_SOURCE)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "kt"), str(d / "kt.c")], check=True)
    return d / "kt"


@pytest.fixture
def kt(kt_binary: Path) -> Iterator[Callable[..., Kt]]:
    started: list[Kt] = []

    def start(*args: str) -> Kt:
        k = Kt(kt_binary, *args)
        started.append(k)
        return k

    yield start
    for k in started:
        k.kill()


def state_of(pid: int, tid: int | None = None) -> tuple[str, int]:
    st = proc.read_status(pid, tid)
    return st["State"][0], int(st["TracerPid"])


def wait_state(pid: int, letter: str, timeout: float = 5.0, tid: int | None = None) -> str:
    """Wait for a state letter: right after a detach a group-stopped task is briefly R."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = state_of(pid, tid)[0]
        if s == letter:
            return s
        time.sleep(0.002)
    return state_of(pid, tid)[0]


def freeze(tids: list[int]) -> list[ptrace.Stop]:
    for t in tids:
        ptrace.seize(t)
    for t in tids:
        ptrace.interrupt(t)
    return [ptrace.wait_stop(t, 5) for t in tids]


def no_more_stops(tid: int) -> bool:
    try:
        ptrace.wait_stop(tid, 0.05)
    except TargetError:
        return True
    return False


# --- seize / interrupt / detach ---------------------------------------------------


def test_freeze_and_detach_multithreaded_leaves_it_running(kt):
    k = kt("sleep", "3", "20")
    tids = proc.list_threads(k.pid)
    assert len(tids) == 4
    stops = freeze(tids)
    assert [s.kind for s in stops] == ["event-stop"] * 4
    assert all(s.sig == signal.SIGTRAP and s.event == ptrace.PTRACE_EVENT_STOP for s in stops)
    for t in tids:
        assert state_of(k.pid, t) == ("t", os.getpid())
    for t in tids:
        ptrace.detach(t)
    for t in tids:
        state, tracer = state_of(k.pid, t)
        assert tracer == 0 and state in "SR"
    assert k.line().startswith("SLEPT 0 0")  # still running its loop


def test_group_stopped_target_reports_group_stop_on_seize_and_stays_stopped(kt):
    k = kt("sleep", "2", "20")
    tids = proc.list_threads(k.pid)
    os.kill(k.pid, signal.SIGSTOP)
    assert wait_state(k.pid, "T") == "T"
    for t in tids:
        ptrace.seize(t)
    # Fact: a seized group-stopped task reports the group-stop by itself ...
    stops = [ptrace.wait_stop(t, 5) for t in tids]
    assert [(s.kind, s.sig) for s in stops] == [("group-stop", signal.SIGSTOP)] * len(tids)
    # ... and a PTRACE_INTERRUPT on top adds no further stop.
    for t in tids:
        ptrace.interrupt(t)
    assert all(no_more_stops(t) for t in tids)
    for t in tids:
        ptrace.detach(t)
    for t in tids:  # back in group-stop (after a brief R), untraced
        assert wait_state(k.pid, "T", tid=t) == "T"
        assert state_of(k.pid, t) == ("T", 0)
    os.kill(k.pid, signal.SIGCONT)
    assert k.line().startswith("SLEPT 0 0")


def test_sigstop_sent_while_frozen_takes_effect_after_detach(kt):
    k = kt("sleep", "0", "20")
    assert freeze([k.pid])[0].kind == "event-stop"
    os.kill(k.pid, signal.SIGSTOP)
    assert no_more_stops(k.pid)  # stays pending: visible in ShdPnd, no new stop
    assert proc.read_signal_masks(k.pid, k.pid)["shared_pending"] & (1 << (signal.SIGSTOP - 1))
    ptrace.detach(k.pid)
    assert wait_state(k.pid, "T") == "T"
    os.kill(k.pid, signal.SIGCONT)


def test_interrupt_stop_comes_before_pending_signals(kt):
    k = kt("sleep", "0", "20")
    ptrace.seize(k.pid)
    os.kill(k.pid, signal.SIGWINCH)
    ptrace.interrupt(k.pid)
    stop = ptrace.wait_stop(k.pid)
    # Either order is legal per ptrace(2); on 6.18 the interrupt trap is usually first.
    if stop.kind == "signal-stop":
        assert stop.sig == signal.SIGWINCH
        ptrace.cont(k.pid, stop.sig)
        stop = ptrace.wait_stop(k.pid)
    assert stop.kind == "event-stop"
    ptrace.detach(k.pid)


def test_wait_stop_timeout_does_not_hang(kt):
    k = kt("pause")
    ptrace.seize(k.pid)
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="did not stop"):
        ptrace.wait_stop(k.pid, 0.1)
    assert time.monotonic() - t0 < 1
    ptrace.interrupt(k.pid)  # detach needs the tracee stopped
    ptrace.wait_stop(k.pid)
    ptrace.detach(k.pid)


def test_wait_stop_reports_exit_and_kill(kt):
    k = kt("pause")
    freeze([k.pid])
    os.kill(k.pid, signal.SIGKILL)
    stop = ptrace.wait_stop(k.pid)
    assert (stop.kind, stop.sig) == ("killed", signal.SIGKILL)


def test_seize_missing_process_is_target_error():
    with pytest.raises(TargetError, match="does not exist"):
        ptrace.seize(2**22 + 12345)


def test_seize_already_traced_names_the_tracer(kt):
    k = kt("pause")
    ptrace.seize(k.pid)
    # A second tracer: a child process of ours trying to seize the same target.
    code = (
        "import sys\n"
        "from checkpointer.errors import TargetError\n"
        "from checkpointer.kernel import ptrace\n"
        "try:\n"
        f"    ptrace.seize({k.pid})\n"
        "except TargetError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [os.sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert f"already traced by PID {os.getpid()}" in out
    ptrace.interrupt(k.pid)
    ptrace.wait_stop(k.pid)
    ptrace.detach(k.pid)


def test_ptrace_on_untraced_task_is_target_error(kt):
    k = kt("pause")
    with pytest.raises(TargetError, match="not stopped under our ptrace"):
        ptrace.get_regs(k.pid)


# --- registers, xstate, sigmask ---------------------------------------------------------


def test_regs_of_a_known_spin_loop(kt):
    k = kt("spin")
    time.sleep(0.02)
    freeze([k.pid])
    r1 = ptrace.get_regs(k.pid)
    assert set(ptrace.REG_NAMES) <= set(r1) and {"fs_base", "gs_base", "orig_rax"} <= set(r1)
    assert r1["r12"] == 0x1122334455667788
    assert r1["orig_rax"] == 2**64 - 1  # not in a syscall
    assert r1["fs_base"] != 0  # glibc TLS
    ptrace.cont(k.pid)
    time.sleep(0.01)
    ptrace.interrupt(k.pid)
    assert ptrace.wait_stop(k.pid).kind == "event-stop"
    r2 = ptrace.get_regs(k.pid)
    assert r2["r13"] > r1["r13"]  # the counter moved while it ran
    assert abs(r2["rip"] - r1["rip"]) < 16  # still in the 2-instruction loop
    # set_regs round trip: change r12, read it back, put it back
    ptrace.set_regs(k.pid, {**r2, "r12": 42})
    assert ptrace.get_regs(k.pid)["r12"] == 42
    ptrace.set_regs(k.pid, r2)
    assert ptrace.get_regs(k.pid) == r2
    ptrace.detach(k.pid)


def test_orig_rax_in_nanosleep(kt):
    k = kt("sleep", "0", "500")
    time.sleep(0.05)
    freeze([k.pid])
    regs = ptrace.get_regs(k.pid)
    assert regs["orig_rax"] in (35, 230)  # nanosleep / clock_nanosleep
    ptrace.detach(k.pid)


def test_xstate_has_xsave_header(kt):
    k = kt("pause")
    freeze([k.pid])
    xs = ptrace.get_xstate(k.pid)
    assert 576 < len(xs) <= 64 * 1024  # legacy area 512 + header 64 + extended
    xstate_bv = int.from_bytes(xs[512:520], "little")
    assert xstate_bv & 0b11  # x87 and SSE components recorded
    # for ptrace the kernel puts XCR0 (the enabled user features) in sw_reserved[0:8]
    xcr0 = int.from_bytes(xs[464:472], "little")
    assert xcr0 & 0b11 == 0b11 and xstate_bv & ~xcr0 == 0
    ptrace.detach(k.pid)


def test_sigmask_round_trip(kt):
    k = kt("pause")
    freeze([k.pid])
    mask = ptrace.get_sigmask(k.pid)
    assert mask == proc.read_signal_masks(k.pid, k.pid)["blocked"]
    ptrace.set_sigmask(k.pid, mask | (1 << (signal.SIGUSR2 - 1)))
    assert ptrace.get_sigmask(k.pid) == mask | (1 << (signal.SIGUSR2 - 1))
    ptrace.set_sigmask(k.pid, mask)
    ptrace.detach(k.pid)


# --- syscall injection ------------------------------------------------------------------


def test_inject_getpid_and_interrupted_nanosleep_completes(kt):
    k = kt("sleep", "1", "300")
    time.sleep(0.05)  # inside the first nanosleep
    freeze([k.pid])
    before = ptrace.get_regs(k.pid)
    assert ptrace.inject_syscall(k.pid, NR_getpid) == k.pid
    assert ptrace.get_regs(k.pid) == before
    ptrace.detach(k.pid)
    ret, err, elapsed = k.line().split()[1:]
    assert (ret, err) == ("0", "0")  # restarted, not EINTR
    assert 290 <= int(elapsed) < 2000


def test_inject_into_blocking_read_keeps_the_read_working(kt):
    k = kt("read", "1")
    time.sleep(0.05)
    freeze([k.pid])
    assert ptrace.get_regs(k.pid)["orig_rax"] == 0  # read
    assert ptrace.inject_syscall(k.pid, NR_getpid) == k.pid
    with pytest.raises(OSError) as exc:
        ptrace.inject_syscall(k.pid, NR_close, 987654)
    assert exc.value.errno == errno.EBADF
    ptrace.detach(k.pid)
    k.proc.stdin.write("hello\n")
    k.proc.stdin.flush()
    assert k.line() == "READ 6 0 hello"


def test_inject_does_not_consume_pending_signals(kt):
    k = kt("sleep", "0", "20")
    freeze([k.pid])
    os.kill(k.pid, signal.SIGWINCH)
    bit = 1 << (signal.SIGWINCH - 1)
    assert proc.read_signal_masks(k.pid, k.pid)["shared_pending"] & bit
    mask = ptrace.get_sigmask(k.pid)
    assert ptrace.inject_syscall(k.pid, NR_getpid) == k.pid
    assert proc.read_signal_masks(k.pid, k.pid)["shared_pending"] & bit  # still pending
    assert ptrace.get_sigmask(k.pid) == mask
    ptrace.detach(k.pid)


def test_inject_into_group_stopped_task_keeps_it_stopped(kt):
    k = kt("sleep", "0", "20")
    os.kill(k.pid, signal.SIGSTOP)
    assert wait_state(k.pid, "T") == "T"
    ptrace.seize(k.pid)
    assert ptrace.wait_stop(k.pid).kind == "group-stop"
    assert ptrace.inject_syscall(k.pid, NR_getpid) == k.pid
    ptrace.detach(k.pid)
    assert wait_state(k.pid, "T") == "T"
    assert state_of(k.pid) == ("T", 0)
    os.kill(k.pid, signal.SIGCONT)
    assert k.line().startswith("SLEPT 0 0")


def test_seize_kernel_thread_is_permission_error():
    kthreadd = 2
    if proc.read_comm(kthreadd) != "kthreadd":
        pytest.skip("pid 2 is not kthreadd here")
    with pytest.raises(TargetError, match="permission denied"):
        ptrace.seize(kthreadd)


def test_inject_into_a_non_leader_thread(kt):
    k = kt("sleep", "2", "20")
    tid = proc.list_threads(k.pid)[2]
    freeze([tid])
    assert ptrace.inject_syscall(tid, NR_getpid) == k.pid
    assert ptrace.inject_syscall(tid, 186) == tid  # gettid
    ptrace.detach(tid)
    assert k.line().startswith("SLEPT 0 0")
