"""x86_64 syscall numbers and a thin ctypes `syscall()` wrapper.

The numbers are used twice: to call the kernel from this process (pidfd_open,
pidfd_getfd, userfaultfd, ioctl with pointer arguments) and as the `nr` of a
syscall injected into a target. Debian's headers on the build machines predate
some of them, so they are spelled out here (checked on kernel 6.18).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NR_read = 0
NR_write = 1
NR_close = 3
NR_mmap = 9
NR_mprotect = 10
NR_munmap = 11
NR_brk = 12
NR_rt_sigprocmask = 14
NR_ioctl = 16
NR_rt_sigaction = 13
NR_mremap = 25
NR_madvise = 28
NR_dup3 = 292
NR_setitimer = 38
NR_exit = 60
NR_fchdir = 81
NR_umask = 95
NR_setgroups = 116
NR_setresuid = 117
NR_setresgid = 119
NR_setfsuid = 122
NR_setfsgid = 123
NR_capset = 126
NR_rt_sigqueueinfo = 129
NR_sigaltstack = 131
NR_personality = 135
NR_chroot = 161
NR_setsid = 112
NR_setpgid = 109
NR_mlock = 149
NR_mlock2 = 325
NR_set_tid_address = 218
NR_exit_group = 231
NR_set_robust_list = 273
NR_rt_tgsigqueueinfo = 297
NR_timer_create = 222
NR_timer_settime = 223
NR_timer_gettime = 224
NR_timer_getoverrun = 225
NR_timer_delete = 226
NR_rseq = 334
NR_clone3 = 435
NR_close_range = 436
NR_mseal = 462
NR_nanosleep = 35
NR_getpid = 39
NR_kill = 62
NR_fcntl = 72
NR_flock = 73
NR_prctl = 157
NR_gettid = 186
NR_get_robust_list = 274
NR_tgkill = 234
NR_clock_nanosleep = 230
NR_process_vm_readv = 310
NR_process_vm_writev = 311
NR_userfaultfd = 323
NR_ioprio_set = 251
NR_ioprio_get = 252
NR_pidfd_open = 434
NR_pidfd_getfd = 438

# fcntl commands and open flags the injected syscalls need.
F_DUPFD_CLOEXEC = 1030
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

# Loaded with use_errno so ctypes.get_errno() is reliable right after a call.
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def syscall(nr: int, *args: int) -> int:
    """Call syscall `nr` in this process; raise OSError on failure.

    Arguments are passed as C longs (unsigned values are fine: ctypes wraps them).
    """
    cargs = [ctypes.c_long(a if a < 1 << 63 else a - (1 << 64)) for a in args]
    ret = _syscall(ctypes.c_long(nr), *cargs)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl_ptr(fd: int, request: int, ptr: int) -> int:
    """ioctl(fd, request, ptr) with a raw pointer; returns the ioctl's result.

    fcntl.ioctl copies small buffers and returns 0 or the buffer, which hides the
    return value PAGEMAP_SCAN uses (the number of regions filled).
    """
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def mmap_anon(length: int, prot: int = 3) -> int:
    """mmap(NULL, length, prot, MAP_PRIVATE|MAP_ANONYMOUS) in this process; the address."""
    return syscall(NR_mmap, 0, length, prot, 0x22, (1 << 64) - 1, 0) & ((1 << 64) - 1)


def munmap(addr: int, length: int) -> None:
    syscall(NR_munmap, addr, length)


NR_unshare = 272
CLONE_FS = 0x200


def in_directory(directory: bytes, action: Callable[[], None]) -> None:
    """Run `action` with `directory` as the working directory of the thread that
    runs it, and of no other: a thread of its own that unshares its filesystem
    context (unshare CLONE_FS) first. A relative path is then resolved there, as
    it was for the process that used it (a unix socket bound to "app.sock")."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            syscall(NR_unshare, CLONE_FS)
            os.chdir(directory)
            action()
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=run, name="in-directory")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def get_robust_list(tid: int) -> tuple[int, int]:
    """(head, len) of thread tid's robust futex list, asked from this process
    (needs ptrace read access to tid)."""
    head = ctypes.c_uint64()
    length = ctypes.c_size_t()
    syscall(NR_get_robust_list, tid, ctypes.addressof(head), ctypes.addressof(length))
    return head.value, length.value
