"""kcmp(2): whether two processes share a kernel object."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

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
    each refers to (a program holding 5,000 fds on one file took 31 s of pairwise
    calls before they were sorted)."""

    def kcmp_file(a: int, b: int) -> int:
        (pid1, fd1), (pid2, fd2) = fds[a], fds[b]
        return syscall(NR_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2)

    return _groups(list(range(len(fds))), kcmp_file)


def shared_between(pids: list[int], kind: int) -> list[tuple[int, int]]:
    """Pairs of processes sharing one object of `kind` (KCMP_VM, KCMP_FILES,
    KCMP_FS): each with the next one of its group."""
    groups = _groups(pids, lambda a, b: syscall(NR_kcmp, a, b, kind, 0, 0))
    return [pair for group in groups for pair in itertools.pairwise(group)]


def _groups(items: list[int], kcmp: Callable[[int, int], int]) -> list[list[int]]:
    """`items` grouped by the kernel object they name. kcmp also orders distinct
    objects (1: less, 2: greater), so a sort puts sharers side by side: n log n
    calls, not one per pair."""

    def order(a: int, b: int) -> int:
        return (0, -1, 1)[kcmp(a, b)]

    groups: list[list[int]] = []
    for item in sorted(items, key=functools.cmp_to_key(order)):
        if groups and order(groups[-1][0], item) == 0:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
