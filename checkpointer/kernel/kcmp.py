"""kcmp(2): whether two processes share a kernel object."""

from __future__ import annotations

import functools
import itertools

from checkpointer.kernel.syscalls import syscall

NR_kcmp = 312
KCMP_FILE = 0
KCMP_VM = 1
KCMP_FILES = 2
KCMP_FS = 3


def same_open_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Do the two fds share one open file description (dup, fork)?"""
    return syscall(NR_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) == 0


def open_file_groups(fds: list[tuple[int, int]]) -> list[list[int]]:
    """Indexes into `fds` ((pid, fd) pairs), grouped by the open file description
    each refers to. kcmp orders descriptions, so a sort puts sharers side by side:
    n log n calls (a program holding 5,000 fds on one file took 31 s of pairwise
    calls)."""

    def order(a: int, b: int) -> int:
        (pid1, fd1), (pid2, fd2) = fds[a], fds[b]
        return (0, -1, 1)[syscall(NR_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2)]

    ranked = sorted(range(len(fds)), key=functools.cmp_to_key(order))
    groups: list[list[int]] = []
    for i in ranked:
        if groups and order(groups[-1][0], i) == 0:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def shared_between(pids: list[int], kind: int) -> list[tuple[int, int]]:
    """Pairs of processes sharing one object of `kind` (KCMP_VM, KCMP_FILES,
    KCMP_FS). kcmp also orders distinct objects (1: less, 2: greater), so a sort
    puts sharers side by side: n log n calls, not one per pair."""

    def order(a: int, b: int) -> int:
        return (0, -1, 1)[syscall(NR_kcmp, a, b, kind, 0, 0)]

    ranked = sorted(pids, key=functools.cmp_to_key(order))
    return [(a, b) for a, b in itertools.pairwise(ranked) if order(a, b) == 0]
