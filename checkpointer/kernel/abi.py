"""x86_64 kernel structures that injected syscalls read and write, as struct layouts.

Each is packed into (or unpacked from) a scratch buffer in the target task, so
they are plain `struct.Struct`s rather than ctypes objects of our own memory.
Layouts from the kernel's uapi headers (checked by calling them, kernel 6.18).
"""

from __future__ import annotations

import struct

# struct kernel_sigaction as rt_sigaction(2) takes it on x86_64 (not glibc's):
# handler, flags, restorer, mask (sigsetsize 8).
SIGACTION = struct.Struct("<QQQQ")
SIGSET_SIZE = 8
SA_RESTORER = 0x04000000

# struct itimerval: it_interval {sec, usec}, it_value {sec, usec}.
ITIMERVAL = struct.Struct("<qqqq")
ITIMERSPEC = struct.Struct("<qqqq")  # it_interval {sec, nsec}, it_value {sec, nsec}
# struct sigevent: sigval, signo, notify, then (SIGEV_THREAD_ID) the thread id; 64 bytes
SIGEVENT = struct.Struct("<qiii44x")
SIGEV_NONE, SIGEV_THREAD_ID = 1, 4
ITIMER_NAMES = ("real", "virtual", "prof")  # ITIMER_REAL 0, VIRTUAL 1, PROF 2

# stack_t: ss_sp, ss_flags (int, padded), ss_size.
STACK_T = struct.Struct("<Qi4xQ")
SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31

# struct clone_args (clone3), 11 u64 = 88 bytes: flags, pidfd, child_tid,
# parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup.
CLONE_ARGS = struct.Struct("<11Q")
CLONE_VM = 0x100
CLONE_FS = 0x200
CLONE_FILES = 0x400
CLONE_SIGHAND = 0x800
CLONE_PARENT = 0x8000
CLONE_THREAD = 0x10000
CLONE_SYSVSEM = 0x40000
CLONE_THREAD_FLAGS = (
    CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
)

# struct prctl_mm_map (PR_SET_MM_MAP), 104 bytes: 11 u64 bounds, auxv pointer,
# auxv_size (u32), exe_fd (u32).
PRCTL_MM_MAP = struct.Struct("<11QQII")
MM_MAP_FIELDS = (
    "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
    "start_stack", "arg_start", "arg_end", "env_start", "env_end",
)  # fmt: skip
AUXV_MAX = 448  # bytes of auxv PR_SET_MM_MAP accepts

# rseq(2) registration: area of 32 bytes, 32-byte aligned.
RSEQ_FLAG_UNREGISTER = 1

# robust_list_head is 24 bytes on x86_64 (set_robust_list's len).
ROBUST_LIST_HEAD_SIZE = 24


def pack_sigaction(handler: int, flags: int, restorer: int, mask: int) -> bytes:
    return SIGACTION.pack(handler, flags, restorer, mask)


def unpack_sigaction(data: bytes) -> dict[str, int]:
    handler, flags, restorer, mask = SIGACTION.unpack_from(data)
    return {"handler": handler, "flags": flags, "restorer": restorer, "mask": mask}


def unpack_itimerval(data: bytes) -> list[int]:
    """[interval_us, value_us] of an itimerval."""
    isec, iusec, vsec, vusec = ITIMERVAL.unpack_from(data)
    return [isec * 1_000_000 + iusec, vsec * 1_000_000 + vusec]


def pack_itimerval(interval_us: int, value_us: int) -> bytes:
    return ITIMERVAL.pack(*divmod(interval_us, 1_000_000), *divmod(value_us, 1_000_000))


def unpack_stack(data: bytes) -> dict[str, int]:
    sp, flags, size = STACK_T.unpack_from(data)
    return {"sp": sp, "flags": flags, "size": size}


def pack_stack(sp: int, flags: int, size: int) -> bytes:
    return STACK_T.pack(sp, flags, size)
