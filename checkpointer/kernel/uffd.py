"""userfaultfd write-protect tracking of another process (KERNEL-NOTES section 2).

The uffd must belong to the target (registration is per mm), so it is created by
injecting userfaultfd() into a stopped thread; we then take a copy of the fd with
pidfd_getfd and issue UFFDIO_API / UFFDIO_REGISTER from here. With WP_ASYNC the
kernel resolves write faults itself (no handler thread), and PAGEMAP_SCAN with
PM_SCAN_WP_MATCHING reads-and-resets the written pages. Tracking lives as long as
some copy of the uffd file is open; the target's copy keeps it across our runs.
"""

from __future__ import annotations

import ctypes
import errno
import os

from checkpointer.errors import TargetError
from checkpointer.kernel import proc, ptrace
from checkpointer.kernel.syscalls import (
    F_DUPFD_CLOEXEC,
    O_CLOEXEC,
    O_NONBLOCK,
    NR_close,
    NR_fcntl,
    NR_pidfd_getfd,
    NR_pidfd_open,
    NR_userfaultfd,
    ioctl_ptr,
    syscall,
)

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_REGISTER_MODE_WP = 2
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_USER_MODE_ONLY = 1
PIDFD_THREAD = 0o200  # O_EXCL: a pidfd for one thread (6.9+)
# What the tracker asks for: async WP (no handler), unpopulated ptes marked too, shmem.
WP_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM

UFFD_LINK = "anon_inode:[userfaultfd]"
USERFAULTFD_FLAGS = O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY


class _UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


def open_target_uffd(pid: int, tid: int, *, high_fd: int | None = None) -> int:
    """Create a userfaultfd inside the target; return its fd number there.

    tid must be a thread of pid in a ptrace stop (seized + interrupted). With high_fd,
    the fd is moved to the lowest free fd >= high_fd (F_DUPFD_CLOEXEC + close), out of
    the way of the application's own low fds.
    """
    fd = ptrace.inject_syscall(tid, NR_userfaultfd, USERFAULTFD_FLAGS)
    if high_fd is not None:
        try:
            new = ptrace.inject_syscall(tid, NR_fcntl, fd, F_DUPFD_CLOEXEC, high_fd)
        finally:
            ptrace.inject_syscall(tid, NR_close, fd)  # the low copy goes either way
        fd = new
    return fd


def open_own_uffd() -> int:
    """A userfaultfd for this process (probes): user-mode only, CLOEXEC, NONBLOCK."""
    return syscall(NR_userfaultfd, USERFAULTFD_FLAGS)


def close_target_fd(pid: int, tid: int, fd: int) -> None:
    """close(fd) inside the target (tid in a ptrace stop)."""
    ptrace.inject_syscall(tid, NR_close, fd)


def find_target_uffd(pid: int) -> int | None:
    """The lowest fd of pid that is a userfaultfd, or None."""
    fds = target_uffds(pid)
    return fds[0] if fds else None


def target_uffds(pid: int) -> list[int]:
    """Every fd of pid that is a userfaultfd."""
    out = []
    try:
        names = os.listdir(f"{proc.task_dir(pid)}/fd")
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} does not exist (exited)") from None
    for fd in sorted(int(n) for n in names):
        try:
            if os.readlink(f"{proc.task_dir(pid)}/fd/{fd}") == UFFD_LINK:
                out.append(fd)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def is_target_uffd(pid: int, target_fd: int) -> bool:
    """Is fd target_fd of pid (still) a userfaultfd? False if closed or reused."""
    try:
        return os.readlink(f"{proc.task_dir(pid)}/fd/{target_fd}") == UFFD_LINK
    except (FileNotFoundError, ProcessLookupError):
        if not os.path.exists(f"/proc/{pid}"):
            raise TargetError(f"process {pid} does not exist (exited)") from None
        return False


def get_fd(pid: int, target_fd: int) -> int:
    """A copy of the target's fd in this process (pidfd_open + pidfd_getfd), CLOEXEC."""
    tid = proc.live_tid(pid)
    try:
        # A thread pidfd (PIDFD_THREAD, 6.9+) when the main thread has exited:
        # pidfd_getfd takes the files of the pidfd's own task.
        pidfd = syscall(NR_pidfd_open, tid, PIDFD_THREAD if tid != pid else 0)
    except ProcessLookupError:
        raise TargetError(f"process {pid} does not exist (exited)") from None
    try:
        return syscall(NR_pidfd_getfd, pidfd, target_fd, 0)
    except ProcessLookupError:
        raise TargetError(f"process {pid} does not exist (exited)") from None
    except PermissionError:
        raise TargetError(
            f"cannot take fd {target_fd} of process {pid}: permission denied"
        ) from None
    finally:
        os.close(pidfd)


def uffd_api(fd: int, features: int = WP_FEATURES) -> int:
    """UFFDIO_API handshake; returns the feature bits the kernel reports.

    Only once per uffd file: a uffd reused from the target (find_target_uffd) has
    already had it and gets EINVAL/EPERM: do not call it again there.
    """
    api = _UffdioApi(UFFD_API, features, 0)
    ioctl_ptr(fd, UFFDIO_API, ctypes.addressof(api))
    return api.features


def register_wp(fd: int, start: int, length: int) -> bool:
    """UFFDIO_REGISTER in write-protect mode. False if the kernel refuses it.

    Refused (False): EINVAL for [vdso]/[vvar]/[vsyscall]/MAP_DROPPABLE, EPERM for
    read-only MAP_SHARED files, EBUSY for a VMA registered with another
    userfaultfd (the target's own): callers dump those in full. Registering a VMA
    already registered with this fd again succeeds and changes nothing, so True
    also tells "this registration is ours". Other errors raise OSError.
    """
    reg = _UffdioRegister(start, length, UFFDIO_REGISTER_MODE_WP, 0)
    try:
        ioctl_ptr(fd, UFFDIO_REGISTER, ctypes.addressof(reg))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EPERM, errno.EBUSY):
            return False
        raise
    return True


def unregister(fd: int, start: int, length: int) -> bool:
    """UFFDIO_UNREGISTER; False if the kernel refuses the range (EINVAL/EPERM)."""
    rng = _UffdioRange(start, length)
    try:
        ioctl_ptr(fd, UFFDIO_UNREGISTER, ctypes.addressof(rng))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EPERM):
            return False
        raise
    return True


def vma_is_wp_registered(vmflags: list[str] | tuple[str, ...]) -> bool:
    """'uw' in smaps VmFlags: the VMA is registered for uffd write-protect."""
    return "uw" in vmflags
