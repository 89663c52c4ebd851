"""Run many syscalls inside a stopped task: the job CRIU gives its parasite.

A SyscallSession points the task's rip at a `syscall` instruction (0f 05) in its
[vdso] and single-steps it, once per call. Every signal is blocked while the
session is open, so nothing but our step can stop the task; orig_rax = -1, so the
kernel never "restarts" the syscall the task was interrupted in over ours. On
close the task gets its registers and signal mask back exactly (unless the
caller took over its registers, as restore does).

Buffers the kernel writes into (sigaction, itimerval, stack_t...) live in a
scratch mapping the session creates in the task on first use and removes on
close; `read` and `write` go through /proc/TID/mem, which also reaches pages the
task itself may not write.
"""

from __future__ import annotations

import errno
import os
import signal

from checkpointer.errors import TargetError
from checkpointer.kernel import ptrace
from checkpointer.kernel.syscalls import NR_mmap, NR_munmap

_U64 = (1 << 64) - 1
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# mmap(2) constants for the scratch page.
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MAX_STEPS = 16  # event stops (fork, clone, exec) a single syscall may report


class SyscallSession:
    """Context manager: inject syscalls into `tid`, which must be in a ptrace stop.

    restore_regs=False leaves the registers as the last call left them (restore
    sets the final registers itself); insn, when given, is the address of a
    `syscall` instruction to use instead of searching the [vdso].
    """

    def __init__(self, tid: int, *, restore_regs: bool = True, insn: int | None = None) -> None:
        self.tid = tid
        self.restore_regs = restore_regs
        self.insn = insn
        self._saved: dict[str, int] | None = None
        self._saved_mask = 0
        self._mem = -1
        self._scratch = 0
        self._scratch_size = 0
        self._scratch_owned = False
        self.events: list[tuple[int, int]] = []  # (PTRACE_EVENT_*, GETEVENTMSG) seen
        # After a step the task sits in a SIGTRAP signal-delivery-stop: a tracer that
        # dies then would let that SIGTRAP kill it (see _back_to_event_stop).
        self._in_step_trap = False

    # -- lifetime ------------------------------------------------------------

    def __enter__(self) -> SyscallSession:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._saved = ptrace.get_regs(self.tid)
        self._saved_mask = ptrace.get_sigmask(self.tid)
        if self.insn is None:
            self.insn = ptrace.find_syscall_insn(self.tid)
        ptrace.set_sigmask(self.tid, _U64)

    def close(self) -> None:
        """Free the scratch page and give the task back its registers and mask."""
        try:
            if self._scratch and self._scratch_owned:
                try:
                    self.call(NR_munmap, self._scratch, self._scratch_size)
                except OSError:
                    pass
                self._scratch = 0
            if self._saved is not None and self.restore_regs:
                ptrace.set_regs(self.tid, self._saved)
                ptrace.set_sigmask(self.tid, self._saved_mask)
                if self._in_step_trap:
                    self._back_to_event_stop()
        except TargetError:
            pass  # the task is gone; nothing to give back
        finally:
            self._saved = None
            if self._mem >= 0:
                os.close(self._mem)
                self._mem = -1

    def _back_to_event_stop(self) -> None:
        """Trade the step's SIGTRAP signal-delivery-stop for a PTRACE_INTERRUPT
        event-stop, as the freezer left it: resuming with signal 0 discards the
        SIGTRAP and the pending interrupt traps again before any user instruction.
        A tracer killed afterwards (SIGKILL of the tool) then simply lets the task
        run on; from the step trap the kernel would deliver the SIGTRAP and kill it."""
        ptrace.interrupt(self.tid)
        ptrace.cont(self.tid, 0)
        for _ in range(MAX_STEPS):
            stop = ptrace.wait_stop(self.tid, 10.0)
            if stop.kind in ("event-stop", "group-stop") and stop.event == ptrace.PTRACE_EVENT_STOP:
                break
            if stop.kind in ("exited", "killed"):
                raise TargetError(f"task {self.tid} {stop.kind}")
            ptrace.cont(self.tid, stop.sig if stop.kind == "signal-stop" else 0)
        self._in_step_trap = False

    @property
    def saved_regs(self) -> dict[str, int]:
        """The registers the task had when the session opened."""
        assert self._saved is not None, "session not open"
        return dict(self._saved)

    # -- syscalls -------------------------------------------------------------

    def call(self, nr: int, *args: int) -> int:
        """Run syscall nr(args) in the task; its result, or OSError(-result)."""
        result = self.call_raw(nr, *args)
        if result >= (1 << 64) - 4095:
            err = (1 << 64) - result
            raise OSError(err, f"syscall {nr} in task {self.tid}: {os.strerror(err)}")
        return result

    def call_raw(self, nr: int, *args: int) -> int:
        """Run the syscall; its raw (unsigned) rax, errors included."""
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        assert self._saved is not None and self.insn is not None, "session not open"
        regs = dict(self._saved)
        regs["rip"] = self.insn
        regs["rax"] = nr
        regs["orig_rax"] = _U64
        for name, value in zip(_ARG_REGS, args, strict=False):
            regs[name] = value & _U64
        ptrace.set_regs(self.tid, regs)
        for _ in range(MAX_STEPS):
            ptrace.singlestep(self.tid)
            stop = ptrace.wait_stop(self.tid, 10.0)
            if stop.kind in ("exited", "killed"):
                raise TargetError(f"task {self.tid} {stop.kind} during an injected syscall {nr}")
            if stop.event and stop.event != ptrace.PTRACE_EVENT_STOP:
                # fork/clone/exec event inside our syscall: note it, step on.
                self.events.append((stop.event, ptrace.get_event_msg(self.tid)))
                continue
            if stop.kind == "signal-stop" and stop.sig == signal.SIGTRAP:
                self._in_step_trap = True
                after = ptrace.get_regs(self.tid)
                if after["rip"] == self.insn + 2:
                    return after["rax"]
            # Any other stop came before our instruction ran: step again.
        raise TargetError(f"task {self.tid}: injected syscall {nr} did not complete")

    def call_exit(self, nr: int, *args: int) -> None:
        """Run a syscall that ends the task (exit, exit_group) and wait until the
        task is gone, as its tracer (its real parent still sees it as a zombie)."""
        assert self._saved is not None and self.insn is not None, "session not open"
        regs = dict(self._saved)
        regs.update(rip=self.insn, rax=nr, orig_rax=_U64)
        for name, value in zip(_ARG_REGS, args, strict=False):
            regs[name] = value & _U64
        ptrace.set_regs(self.tid, regs)
        self._saved, self._scratch = None, 0  # nothing to give back or unmap
        ptrace.cont(self.tid)
        while ptrace.wait_stop(self.tid, 10.0).kind not in ("exited", "killed"):
            ptrace.cont(self.tid)

    def die_of(self, sig: int) -> None:
        """Let the task be killed by `sig` (its default action): unblock it, send it,
        and pass it on at the signal stop; wait until the task is gone."""
        assert self._saved is not None, "session not open"
        self._saved, self._scratch = None, 0
        ptrace.set_sigmask(self.tid, 0)
        os.kill(self.tid, sig)
        ptrace.cont(self.tid)
        while (stop := ptrace.wait_stop(self.tid, 10.0)).kind not in ("exited", "killed"):
            ptrace.cont(self.tid, stop.sig if stop.kind == "signal-stop" else 0)

    # -- memory ----------------------------------------------------------------

    def _mem_fd(self) -> int:
        if self._mem < 0:
            try:
                self._mem = os.open(f"/proc/{self.tid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise TargetError(f"task {self.tid} does not exist (exited)") from None
        return self._mem

    def read(self, addr: int, size: int) -> bytes:
        data = os.pread(self._mem_fd(), size, addr)
        if len(data) != size:
            raise OSError(errno.EIO, f"task {self.tid}: short read at {addr:#x}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        if os.pwrite(self._mem_fd(), data, addr) != len(data):
            raise OSError(errno.EIO, f"task {self.tid}: short write at {addr:#x}")

    def scratch(self, size: int = PAGE_SIZE, near: int = 0) -> int:
        """Address of a read-write scratch area of at least `size` bytes in the task
        (mapped on first use, at `near` if that hint is free; unmapped on close).
        Callers share it: it holds one call's buffers at a time.

        It is MAP_SHARED anonymous memory so that it can never merge with a
        neighbouring private VMA: a merge would change that VMA's soft-dirty and
        uffd-wp state, which a dump of the task reads right after."""
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        if self._scratch and self._scratch_size >= size:
            return self._scratch
        if self._scratch:
            if not self._scratch_owned:
                raise ValueError(f"adopted scratch of {self._scratch_size} bytes is too small")
            self.call(NR_munmap, self._scratch, self._scratch_size)
        self._scratch = 0
        # Shared, so it can never merge with a neighbouring private VMA (whose
        # soft-dirty or uffd-wp state it would disturb) and leaves no trace.
        self._scratch = self.call(
            NR_mmap, near, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, _U64, 0
        )
        self._scratch_size = size
        self._scratch_owned = True
        return self._scratch

    def adopt_scratch(self, addr: int, size: int, *, unmap_on_close: bool = False) -> None:
        """Use an area mapped elsewhere: a restored process's threads share the one
        placed in a gap of the image; a dump lends every thread's session the
        scratch of its process's first session. Unmapped on close only if asked."""
        self._scratch, self._scratch_size = addr, size
        self._scratch_owned = unmap_on_close

    def call_with_buffer(self, nr: int, args: tuple, buf: bytes | int) -> tuple[int, bytes]:
        """Run a syscall whose arguments point into a buffer; `buf` is its initial
        contents (or its size, zero-filled). Arguments equal to the BUF marker are
        replaced by the buffer's address. Returns (result, buffer after the call)."""
        data = bytes(buf) if isinstance(buf, int) else buf
        addr = self.scratch(len(data))
        self.write(addr, data)
        real = tuple(
            addr if a is BUF else (addr + a.offset if isinstance(a, At) else a) for a in args
        )
        result = self.call(nr, *real)
        return result, self.read(addr, len(data))


class _BufMarker:
    """Stands for the scratch buffer's address in call_with_buffer's arguments."""

    def __repr__(self) -> str:
        return "BUF"


BUF = _BufMarker()


class At:
    """An address inside the scratch buffer: At(offset)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
