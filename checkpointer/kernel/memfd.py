"""memfd: read its seals (dump), make a new one with the same (restore)."""

from __future__ import annotations

import fcntl
import os

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL = 1
MFD_ALLOW_SEALING = 2


def read_seals(fd: int) -> int:
    """F_GET_SEALS: F_SEAL_SEAL alone for a memfd made without MFD_ALLOW_SEALING."""
    return fcntl.fcntl(fd, F_GET_SEALS)


def new_memfd(name: str, size: int, seals: int) -> int:
    """A memfd of `size` bytes; sealing allowed when seals other than F_SEAL_SEAL
    are to be added (add_seals, once it is filled)."""
    flags = os.MFD_CLOEXEC | (MFD_ALLOW_SEALING if seals & ~F_SEAL_SEAL else 0)
    fd = os.memfd_create(name[:249], flags)
    os.ftruncate(fd, size)
    return fd


def add_seals(fd: int, seals: int) -> None:
    if seals & ~F_SEAL_SEAL:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
