"""Task state only the task itself can tell: read by syscalls injected into it.

Signal handlers, interval timers, prctl flags, the program break, the clear-tid
address and the alternate signal stack are not in /proc. Each reader here is a
Query: the `get` syscalls to run in a stopped task, with their output buffers in
the session's scratch mapping. The queries of one task run together
(run_queries): one SyscallSession.call_many batch, so one stop for all of them,
and one read of the buffer they wrote.

Process-wide state (sigactions, itimers, brk, prctl) may be read in any live thread
of the process; per-thread state (tid address, sigaltstack: thread_state_query) in
that very thread.
The readers that need no injection (robust list, rseq) take a tid.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Query:
    """Syscalls that read some state, the buffer they write into (At(offset) in
    their arguments, from 0), and how to make the answer of their results and
    that buffer. Queries run together, as one batch: run_queries."""

    calls: list[tuple]
    size: int
    parse: Callable[[list[int], bytes], Any]


def run_queries(session: SyscallSession, queries: list[Query]) -> list[Any]:
    """The answers of `queries`, run as one call_many batch (one stop for all of
    them): each query's buffer gets its own part of the session's buffer."""
    calls: list[tuple] = []
    spans = []
    offset = 0
    for q in queries:
        first = len(calls)
        calls += [_shifted(call, offset) for call in q.calls]
        spans.append((first, len(calls), offset))
        offset += q.size
    results, data = session.call_many(calls, offset)
    return [
        q.parse(results[first:last], data[at : at + q.size])
        for q, (first, last, at) in zip(queries, spans, strict=True)
    ]


def _shifted(call: tuple, offset: int) -> tuple:
    return tuple(At(a.offset + offset) if isinstance(a, At) else a for a in call)


def sigactions_query() -> Query:
    """{sig, handler, flags, restorer, mask} of every signal but SIGKILL and SIGSTOP."""
    size = abi.SIGACTION.size
    calls = [
        (NR_rt_sigaction, sig, 0, At(i * size), abi.SIGSET_SIZE)
        for i, sig in enumerate(SIGNALS_WITH_ACTION)
    ]

    def parse(_: list[int], data: bytes) -> list[dict[str, int]]:
        return [
            {"sig": sig, **abi.unpack_sigaction(data[i * size : (i + 1) * size])}
            for i, sig in enumerate(SIGNALS_WITH_ACTION)
        ]

    return Query(calls, size * len(calls), parse)


def itimers_query() -> Query:
    """{"real"|"virtual"|"prof": [interval_us, value_us]}: value is the time left."""
    size = abi.ITIMERVAL.size
    calls = [(NR_getitimer, which, At(which * size)) for which in range(len(abi.ITIMER_NAMES))]

    def parse(_: list[int], data: bytes) -> dict[str, list[int]]:
        return {
            name: abi.unpack_itimerval(data[i * size : (i + 1) * size])
            for i, name in enumerate(abi.ITIMER_NAMES)
        }

    return Query(calls, size * len(calls), parse)


def posix_timer_times_query(ids: list[int]) -> Query:
    """[{value [s, ns] (time left), interval [s, ns], overrun}] of each timer id."""
    size = abi.ITIMERSPEC.size
    calls = [(syscalls.NR_timer_gettime, tid, At(i * size)) for i, tid in enumerate(ids)]
    calls += [(syscalls.NR_timer_getoverrun, tid) for tid in ids]

    def parse(results: list[int], data: bytes) -> list[dict]:
        out = []
        for i in range(len(ids)):
            isec, insec, vsec, vnsec = abi.ITIMERSPEC.unpack_from(data, i * size)
            out.append({"value": [vsec, vnsec], "interval": [isec, insec],
                        "overrun": results[len(ids) + i]})  # fmt: skip
        return out

    return Query(calls, size * len(ids), parse)


def prctl_query() -> Query:
    """dumpable, pdeathsig, child_subreaper, no_new_privs, thp_disable, securebits.

    pdeathsig, no_new_privs and securebits belong to the thread the session is in.
    """
    by_result = [(NR_prctl, option, 0, 0, 0, 0) for option in PRCTL_BY_RESULT.values()]
    by_pointer = [
        (NR_prctl, option, At(i * _INT.size), 0, 0, 0)
        for i, option in enumerate(PRCTL_BY_POINTER.values())
    ]

    def parse(results: list[int], data: bytes) -> dict[str, int]:
        out = dict(zip(PRCTL_BY_RESULT, results, strict=False))
        for i, name in enumerate(PRCTL_BY_POINTER):
            out[name] = _INT.unpack_from(data, i * _INT.size)[0]
        return dict(sorted(out.items()))

    return Query(by_result + by_pointer, _INT.size * len(by_pointer), parse)


def brk_query() -> Query:
    """The exact program break (mm->brk): brk(0) fails to move it and returns it."""
    return Query([(NR_brk, 0)], 0, lambda results, _: results[0])


def thread_state_query() -> Query:
    """The session's thread's own state: {"tid_address": its clear_child_tid
    (set_tid_address, CLONE_CHILD_CLEARTID), "sigaltstack": its alternate signal
    stack {sp, flags, size} (flags SS_DISABLE = 2 when it has none, SS_ONSTACK = 1
    while running on it)}."""
    calls = [
        (NR_prctl, PR_GET_TID_ADDRESS, At(0), 0, 0, 0),
        (NR_sigaltstack, 0, At(_U64.size)),
    ]

    def parse(_: list[int], data: bytes) -> dict:
        return {
            "tid_address": _U64.unpack_from(data)[0],
            "sigaltstack": abi.unpack_stack(data[_U64.size :]),
        }

    return Query(calls, _U64.size + abi.STACK_T.size, parse)


def read_robust_list(tid: int) -> list[int]:
    """[head, len] of the thread's robust futex list (get_robust_list from outside)."""
    return list(syscalls.get_robust_list(tid))
