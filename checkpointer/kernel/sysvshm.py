"""SysV shared memory segments: read their description (/proc/sysvipc/shm), make
one with a given key and, where the kernel allows, id (/proc/sys/kernel/shm_next_id),
fill it, attach it inside a task (shmat injected), remove it."""

from __future__ import annotations

import ctypes

from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import syscall

NR_shmget, NR_shmat, NR_shmctl, NR_shmdt = 29, 30, 31, 67
IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
SHM_DEST = 0o1000  # in the mode: removed (IPC_RMID) but still attached
SHM_NEXT_ID = "/proc/sys/kernel/shm_next_id"


def read_segment(shmid: int) -> dict[str, int] | None:
    """{key, id, size, mode} of segment `shmid` (mode includes SHM_DEST; the key
    reads 0 once it was removed)."""
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            cols = line.split()
            if int(cols[1]) == shmid:
                return {"key": int(cols[0]), "id": shmid, "size": int(cols[3]),
                        "mode": int(cols[2], 8)}  # fmt: skip
    return None


def find_key(key: int) -> dict[str, int] | None:
    """{id, size, attached} of the segment with `key`, if there is one."""
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            cols = line.split()
            if int(cols[0]) == key:
                return {"id": int(cols[1]), "size": int(cols[3]), "attached": int(cols[6])}
    return None


def create(key: int, size: int, mode: int, want_id: int) -> int:
    """A new segment; it gets id `want_id` unless the kernel gives another."""
    try:
        with open(SHM_NEXT_ID, "w") as f:
            f.write(str(want_id))
    except OSError:
        pass  # the id is a wish
    return syscall(NR_shmget, key, size, IPC_CREAT | IPC_EXCL | (mode & 0o777))


def fill(shmid: int, offset: int, data: bytes) -> None:
    """Write data at offset into the segment, through a mapping of ours."""
    addr = syscall(NR_shmat, shmid, 0, 0)
    try:
        ctypes.memmove(addr + offset, data, len(data))
    finally:
        syscall(NR_shmdt, addr)


def remove(shmid: int) -> None:
    syscall(NR_shmctl, shmid, IPC_RMID, 0)


def attach_in(s: SyscallSession, shmid: int, addr: int, writable: bool, executable: bool):
    """shmat(shmid, addr, ...) inside the task, at exactly addr."""
    flags = (0 if writable else SHM_RDONLY) | (SHM_EXEC if executable else 0)
    got = s.call(NR_shmat, shmid, addr, flags)
    if got != addr:
        raise OSError(f"shmat attached at {got:#x}, not {addr:#x}")
