"""SyscallSession against a real process: many syscalls in one stop, buffers, cleanup."""

from __future__ import annotations

import errno
import signal
import time

import pytest
from targetlib import proc_status

from checkpointer.freezer import Freezer
from checkpointer.kernel import abi, proc, ptrace
from checkpointer.kernel.inject import BUF, At, SyscallSession
from checkpointer.kernel.syscalls import NR_close, NR_getpid, NR_gettid, NR_tgkill, syscall

NR_rt_sigaction = 13


def test_session_runs_syscalls_and_leaves_no_trace(spawn):
    t = spawn()
    with Freezer(t.pid) as tree:
        maps_before = proc.read_maps(t.pid)  # frozen: only the session can change them
        tid = tree.threads[t.pid][-1]
        with SyscallSession(tid) as s:
            regs = s.saved_regs
            assert s.call(NR_getpid) == t.pid
            assert s.call(NR_gettid) == tid
            # The C target installs no SIGUSR1 handler: SIG_DFL, no flags.
            _, out = s.call_with_buffer(
                NR_rt_sigaction, (signal.SIGUSR1, 0, BUF, abi.SIGSET_SIZE), abi.SIGACTION.size
            )
            assert abi.unpack_sigaction(out)["handler"] == 0
            assert s.scratch() in {m.start for m in proc.read_maps(t.pid)}
        assert ptrace.get_regs(tid) == regs
        assert proc.read_maps(t.pid) == maps_before  # the scratch page is gone
    assert proc_status(t.pid)["TracerPid"] == "0"
    t.assert_carries_on()


def test_call_many_batches_calls_and_falls_back_one_by_one(spawn):
    t = spawn()
    calls = [(NR_getpid,), (NR_gettid,)] + [
        (NR_rt_sigaction, sig, 0, At(i * 32), abi.SIGSET_SIZE)
        for i, sig in enumerate((signal.SIGUSR1, signal.SIGHUP, signal.SIGCHLD))
    ]
    with Freezer(t.pid) as tree:
        tid = tree.threads[t.pid][-1]
        regs = ptrace.get_regs(tid)
        with SyscallSession(tid) as s:
            results, data = s.call_many(calls, 3 * 32)
            assert results[:2] == [t.pid, tid] and results[2:] == [0, 0, 0]
            assert s.scratch_area[2]  # executable: the calls ran as one batch
            one_by_one = SyscallSession(tid, insn=s.insn)
            # Without executable scratch (memory-deny-write-execute), one call at a time.
            with one_by_one:
                one_by_one.adopt_scratch(*s.scratch_area[:2], unmap_on_close=False)
                assert one_by_one.call_many(calls, 3 * 32) == (results, data)
            with pytest.raises(OSError) as err:
                s.call_many([(NR_getpid,), (NR_close, 987654), (NR_getpid,)])
            assert err.value.errno == errno.EBADF
        assert ptrace.get_regs(tid) == regs
        assert ptrace.poll_stop(tid) is None  # back in the event stop, nothing pending
    t.assert_carries_on()


def test_session_in_a_signal_delivery_stop_runs_calls_one_by_one(spawn):
    # A task in a signal-delivery stop (like a TRACEME seed's SIGSTOP) cannot be
    # PTRACE_INTERRUPTed out of a batch: its calls run one by one, and it stays in
    # the last call's syscall stop until the caller resumes it.
    t = spawn()
    tid = t.pid
    ptrace.seize(tid)
    try:
        # Ignored by default, but a tracer still sees it; to this thread, not another.
        syscall(NR_tgkill, t.pid, tid, signal.SIGCHLD)
        stop = ptrace.wait_stop(tid)
        assert (stop.kind, stop.sig) == ("signal-stop", signal.SIGCHLD)
        assert not ptrace.in_event_stop(tid)
        regs = ptrace.get_regs(tid)
        with SyscallSession(tid) as s:
            results, _ = s.call_many([(NR_getpid,), (NR_gettid,), (NR_getpid,)])
            assert results == [t.pid, tid, t.pid]
            assert not s.scratch_area[0]  # no batch, so no code was placed
        assert ptrace.get_regs(tid) == regs
    finally:
        ptrace.detach(tid)
    t.assert_carries_on()


def test_thread_inside_an_rseq_critical_section_is_aborted_first(spawn):
    # Our syscalls return to user space outside the section, where the kernel clears
    # the thread's rseq_cs: resumed inside the section, it would run on unguarded.
    # The session moves it to its abort handler first, as a preemption would.
    t = spawn("--rseq-cs", "--threads", "0")
    start, post, abort = (int(x, 16) for x in t.set_state["rseq_cs"])
    aborts, _ = t.regions["rseq_aborts"]

    def count() -> int:
        return int.from_bytes(t.read_mem(aborts, 8), "little")

    for _ in range(50):
        with Freezer(t.pid) as tree:
            inside = [
                tid for tid in tree.threads[t.pid] if start <= ptrace.get_regs(tid)["rip"] < post
            ]
            if not inside:
                continue  # between two sections: try again
            (tid,) = inside
            with SyscallSession(tid) as s:
                assert s.call(NR_getpid) == t.pid
                assert s.saved_regs["rip"] == abort
            assert ptrace.get_regs(tid)["rip"] == abort
        break
    else:
        pytest.fail("never caught the thread inside its critical section")
    before = count()
    deadline = time.monotonic() + 5
    while count() == before:  # still aborted on preemption: its rseq_cs is live
        assert time.monotonic() < deadline, "the thread no longer leaves its section"
        time.sleep(0.01)
