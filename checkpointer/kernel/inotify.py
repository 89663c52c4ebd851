"""inotify: read another process's watches from fdinfo, make them again here.

fdinfo names each watched inode by a file handle (name_to_handle_at's), not by a
path: open_by_handle_at, on any mount of the same filesystem, turns it back into
a file, whose /proc/self/fd link is its path. It needs CAP_DAC_READ_SEARCH.

Watch descriptors are numbers the program keeps. The kernel gives the next one
cyclically, after the last it gave, so a watch is added again and removed until
it gets its old number; each removal queues an IN_IGNORED event, read away before
the fd is handed over.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import struct

from checkpointer.kernel import proc
from checkpointer.kernel.syscalls import syscall

NR_open_by_handle_at = 304
_NR_inotify_init1 = 294
_NR_inotify_add_watch = 254
_NR_inotify_rm_watch = 255
IN_DONT_FOLLOW = 0x02000000
IN_MASK_ADD = 0x20000000
FIONREAD = 0x541B
_WATCH = re.compile(
    rb"inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) "
    rb"ignored_mask:([0-9a-f]+) fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) "
    rb"f_handle:([0-9a-f]+)"
)
MAX_WD_STEPS = 1 << 20  # a wd this far past the new group's start is not reached


def read_watches(pid: int, fd: int) -> list[dict]:
    """[{wd, ino, dev, mask, handle_type, handle}] of an inotify fd, dev as
    (major, minor)."""
    out = []
    for m in _WATCH.finditer(proc.read_fdinfo_bytes(pid, fd)):
        sdev = int(m[3], 16)  # the kernel's dev_t: 12 bits of major, 20 of minor
        out.append(
            {
                "wd": int(m[1], 16),
                "ino": int(m[2], 16),
                "dev": (sdev >> 20, sdev & 0xFFFFF),
                "mask": int(m[4], 16),
                "handle_type": int(m[7], 16),
                "handle": bytes.fromhex(m[8].decode())[: int(m[6], 16)],
            }
        )
    return out


def queued_bytes(fd: int) -> int:
    """Bytes of events waiting to be read on our inotify fd `fd`."""
    return struct.unpack("i", fcntl.ioctl(fd, FIONREAD, b"\0" * 4))[0]


def path_of_handle(dev: tuple[int, int], handle_type: int, handle: bytes, ino: int) -> str | None:
    """The path of the file a handle names, through a mount of device `dev` in our
    mount namespace; None if no mount shows it or the file has no name left."""
    for mount_point in _mounts_of(dev):
        try:
            mount_fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            buf = ctypes.create_string_buffer(struct.pack("Ii", len(handle), handle_type) + handle)
            try:
                fd = syscall(NR_open_by_handle_at, mount_fd, ctypes.addressof(buf),
                             os.O_PATH | os.O_CLOEXEC)  # fmt: skip
            except OSError as exc:
                if exc.errno in (errno.ESTALE, errno.ENOENT, errno.EXDEV):
                    continue
                raise
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            finally:
                os.close(fd)
            if path.startswith("/") and st.st_ino == ino:
                return path
        finally:
            os.close(mount_fd)
    return None


def _mounts_of(dev: tuple[int, int]) -> list[str]:
    want = f"{dev[0]}:{dev[1]}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                out.append(fields[4].replace("\\040", " "))
    return out


def new_inotify(flags: int, watches: list[dict]) -> int:
    """An inotify fd (O_NONBLOCK as `flags`) watching each {wd, path, mask} under
    its own wd, with no event queued."""
    fd = syscall(_NR_inotify_init1, os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        for w in sorted(watches, key=lambda w: w["wd"]):
            _add_at(fd, w["path"], w["mask"] | IN_DONT_FOLLOW, w["wd"])
        _drain(fd)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _add_at(fd: int, path: str, mask: int, wd: int) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    for _ in range(MAX_WD_STEPS):
        got = syscall(_NR_inotify_add_watch, fd, ctypes.addressof(raw), mask & ~IN_MASK_ADD)
        if got == wd:
            return
        if got > wd:
            raise OSError(errno.EBUSY, f"watch {wd} of {path} came back as {got}")
        syscall(_NR_inotify_rm_watch, fd, got)
        if got % 256 == 0:
            _drain(fd)  # the IN_IGNORED events of the removals would fill the queue
    raise OSError(errno.EBUSY, f"watch {wd} of {path} is out of reach")


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except BlockingIOError:
            return
