"""kcmp(2): whether two processes share a kernel object."""

from __future__ import annotations

from checkpointer.kernel.syscalls import syscall

NR_kcmp = 312
KCMP_FILE = 0


def same_open_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Do the two fds share one open file description (dup, fork)?"""
    return syscall(NR_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) == 0
