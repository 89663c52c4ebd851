"""SyscallSession against a real process: many syscalls in one stop, buffers, cleanup."""

from __future__ import annotations

import signal

from targetlib import proc_status

from checkpointer.freezer import Freezer
from checkpointer.kernel import abi, proc
from checkpointer.kernel.inject import BUF, SyscallSession
from checkpointer.kernel.syscalls import NR_getpid, NR_gettid

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
        from checkpointer.kernel import ptrace

        assert ptrace.get_regs(tid) == regs
        assert proc.read_maps(t.pid) == maps_before  # the scratch page is gone
    assert proc_status(t.pid)["TracerPid"] == "0"
    t.assert_carries_on()
