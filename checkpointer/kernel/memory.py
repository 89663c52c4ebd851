"""Reading another process's memory through /proc/PID/mem.

One open fd, preadv straight into caller-owned (reused, pre-faulted) buffers:
a fresh multi-GiB destination costs seconds of first-touch faults. As root,
/proc/PID/mem also reads PROT_NONE pages, which process_vm_readv cannot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from checkpointer.errors import TargetError
from checkpointer.kernel import proc
from checkpointer.kernel.syscalls import NR_process_vm_writev, syscall


def _open_mem(pid: int, flags: int) -> int:
    """/proc/PID/mem (through a live thread if the main one has exited)."""
    try:
        return os.open(f"{proc.task_dir(pid)}/mem", flags | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {pid} does not exist (exited)") from None
    except PermissionError:
        raise TargetError(f"cannot open the memory of process {pid}: permission denied") from None


class MemReader:
    """/proc/PID/mem opened once; read_into(addr, buffer) many times."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = _open_mem(pid, os.O_RDONLY)

    def __enter__(self) -> MemReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_into(self, addr: int, buf: memoryview | bytearray) -> int:
        """Fill buf from the target's memory at addr; return the bytes read.

        Short reads are retried. If the kernel cannot read further (EIO: an unmapped
        hole or a page it cannot fault in) the count read so far is returned; if not
        even the first byte can be read, OSError(EIO) names the address. 0 means the
        target's mm is gone (it exited).
        """
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        total = len(mv)
        done = 0
        while done < total:
            try:
                n = os.preadv(self.fd, [mv[done:]], addr + done)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    if done:
                        return done
                    raise OSError(
                        errno.EIO, f"process {self.pid}: cannot read memory at {addr:#x}"
                    ) from None
                if exc.errno == errno.ESRCH:
                    raise TargetError(f"process {self.pid} does not exist (exited)") from None
                raise
            if n == 0:
                break
            done += n
        return done

    def read(self, addr: int, size: int) -> bytes:
        """Convenience for small reads: a new bytes object (short at an unreadable hole)."""
        buf = bytearray(size)
        n = self.read_into(addr, buf)
        return bytes(buf[:n])


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class MemWriter:
    """Writes into another process's memory (a restore filling its pages).

    process_vm_writev copies straight into the target's pages (about 1.6x the rate
    of /proc/PID/mem, whose writes go through a bounce page) but only where the
    target itself may write; the rest (read-only or PROT_NONE pages, which
    /proc/PID/mem writes through) falls back to pwrite on /proc/PID/mem.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = _open_mem(pid, os.O_RDWR)
        self.written = 0  # bytes, over every write
        self._count = threading.Lock()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, addr: int, data: bytes, off: int = 0, size: int | None = None) -> None:
        """Write data[off:off+size] at addr in the target. Safe from several threads
        at once (the restore's pool): each call has iovecs of its own, since the
        syscall runs without the GIL."""
        size = len(data) - off if size is None else size
        local = _Iovec(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value + off, size)
        remote = _Iovec(addr, size)
        try:
            done = syscall(
                NR_process_vm_writev, self.pid, ctypes.addressof(local), 1,
                ctypes.addressof(remote), 1, 0,
            )  # fmt: skip
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise TargetError(f"process {self.pid} does not exist (exited)") from None
            done = 0  # EFAULT: not writable by the target; /proc/PID/mem can
        if done < size:
            rest = memoryview(data)[off + done : off + size]
            if os.pwrite(self.fd, rest, addr + done) != len(rest):
                raise OSError(errno.EIO, f"process {self.pid}: short write at {addr + done:#x}")
        with self._count:
            self.written += size
