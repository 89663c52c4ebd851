"""Task state only the task itself can tell: read by syscalls injected into it.

Signal handlers, interval timers, prctl flags, the program break, the clear-tid
address and the alternate signal stack are not in /proc. Each reader here takes an
open SyscallSession in a stopped task and runs the `get` syscall there, with its
output buffers in the session's scratch mapping: many calls write to distinct
offsets of one buffer, read back with one read, and the calls of one reader run as
one batch (SyscallSession.call_many).

Process-wide state (sigactions, itimers, brk, prctl) may be read in any live thread
of the process; per-thread state (tid address, sigaltstack: read_thread_state) in
that very thread.
The readers that need no injection (robust list, rseq) take a tid.
"""

from __future__ import annotations

import signal
import struct

from checkpointer.kernel import abi, syscalls
from checkpointer.kernel.inject import At, SyscallSession
from checkpointer.kernel.syscalls import NR_brk, NR_prctl

NR_rt_sigaction = 13
NR_getitimer = 36
NR_sigaltstack = 131

# Every signal that has an action: all but SIGKILL and SIGSTOP (rt_sigaction: EINVAL).
SIGNALS_WITH_ACTION = tuple(
    sig for sig in range(1, 65) if sig not in (signal.SIGKILL, signal.SIGSTOP)
)

# prctl(2) options read here, and whether the value comes back through a pointer.
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_GET_SECUREBITS = 27
PR_GET_CHILD_SUBREAPER = 37
PR_GET_NO_NEW_PRIVS = 39
PR_GET_TID_ADDRESS = 40
PR_GET_THP_DISABLE = 42
PRCTL_BY_RESULT = {
    "dumpable": PR_GET_DUMPABLE,
    "no_new_privs": PR_GET_NO_NEW_PRIVS,
    "thp_disable": PR_GET_THP_DISABLE,
    "securebits": PR_GET_SECUREBITS,
}
PRCTL_BY_POINTER = {  # an int the kernel stores at arg2
    "pdeathsig": PR_GET_PDEATHSIG,
    "child_subreaper": PR_GET_CHILD_SUBREAPER,
}

_INT = struct.Struct("<i")
_U64 = struct.Struct("<Q")


def read_sigactions(session: SyscallSession) -> list[dict[str, int]]:
    """{sig, handler, flags, restorer, mask} of every signal but SIGKILL and SIGSTOP."""
    size = abi.SIGACTION.size
    calls = [
        (NR_rt_sigaction, sig, 0, At(i * size), abi.SIGSET_SIZE)
        for i, sig in enumerate(SIGNALS_WITH_ACTION)
    ]
    _, data = session.call_many(calls, size * len(calls))
    return [
        {"sig": sig, **abi.unpack_sigaction(data[i * size : (i + 1) * size])}
        for i, sig in enumerate(SIGNALS_WITH_ACTION)
    ]


def read_itimers(session: SyscallSession) -> dict[str, list[int]]:
    """{"real"|"virtual"|"prof": [interval_us, value_us]}: value is the time left."""
    size = abi.ITIMERVAL.size
    calls = [(NR_getitimer, which, At(which * size)) for which in range(len(abi.ITIMER_NAMES))]
    _, data = session.call_many(calls, size * len(calls))
    return {
        name: abi.unpack_itimerval(data[i * size : (i + 1) * size])
        for i, name in enumerate(abi.ITIMER_NAMES)
    }


def read_posix_timer_times(session: SyscallSession, ids: list[int]) -> list[dict]:
    """[{value [s, ns] (time left), interval [s, ns], overrun}] of each timer id."""
    if not ids:
        return []
    size = abi.ITIMERSPEC.size
    calls = [(syscalls.NR_timer_gettime, tid, At(i * size)) for i, tid in enumerate(ids)]
    calls += [(syscalls.NR_timer_getoverrun, tid) for tid in ids]
    results, data = session.call_many(calls, size * len(ids))
    out = []
    for i in range(len(ids)):
        isec, insec, vsec, vnsec = abi.ITIMERSPEC.unpack_from(data, i * size)
        out.append({"value": [vsec, vnsec], "interval": [isec, insec],
                    "overrun": results[len(ids) + i]})  # fmt: skip
    return out


def read_prctl_state(session: SyscallSession) -> dict[str, int]:
    """dumpable, pdeathsig, child_subreaper, no_new_privs, thp_disable, securebits.

    pdeathsig, no_new_privs and securebits belong to the thread the session is in.
    """
    by_result = [(NR_prctl, option, 0, 0, 0, 0) for option in PRCTL_BY_RESULT.values()]
    by_pointer = [
        (NR_prctl, option, At(i * _INT.size), 0, 0, 0)
        for i, option in enumerate(PRCTL_BY_POINTER.values())
    ]
    results, data = session.call_many(by_result + by_pointer, _INT.size * len(by_pointer))
    out = dict(zip(PRCTL_BY_RESULT, results, strict=False))
    for i, name in enumerate(PRCTL_BY_POINTER):
        out[name] = _INT.unpack_from(data, i * _INT.size)[0]
    return dict(sorted(out.items()))


def read_brk(session: SyscallSession) -> int:
    """The exact program break (mm->brk): brk(0) fails to move it and returns it."""
    return session.call(NR_brk, 0)


def read_thread_state(session: SyscallSession) -> dict:
    """The session's thread's own state, in one batch: {"tid_address": its
    clear_child_tid (set_tid_address, CLONE_CHILD_CLEARTID), "sigaltstack": its
    alternate signal stack {sp, flags, size} (flags SS_DISABLE = 2 when it has none,
    SS_ONSTACK = 1 while running on it)}."""
    calls = [
        (NR_prctl, PR_GET_TID_ADDRESS, At(0), 0, 0, 0),
        (NR_sigaltstack, 0, At(_U64.size)),
    ]
    _, data = session.call_many(calls, _U64.size + abi.STACK_T.size)
    return {
        "tid_address": _U64.unpack_from(data)[0],
        "sigaltstack": abi.unpack_stack(data[_U64.size :]),
    }


def read_robust_list(tid: int) -> list[int]:
    """[head, len] of the thread's robust futex list (get_robust_list from outside)."""
    return list(syscalls.get_robust_list(tid))
