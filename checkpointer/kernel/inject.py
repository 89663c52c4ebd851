"""Run many syscalls inside a stopped task: the job CRIU gives its parasite.

A SyscallSession points the task's rip at a `syscall` instruction (0f 05) in its
[vdso] and runs it with PTRACE_SYSCALL to its entry stop, then to its exit stop.
Every signal is blocked while the session is open, so nothing but our syscall can
stop the task; orig_rax = -1, so the kernel never "restarts" the syscall the task
was interrupted in over ours. On close the task gets its registers and signal mask
back exactly (unless the caller took over its registers, as restore does) and, if
the session found it in a PTRACE_EVENT_STOP, is put back into one.

A thread found inside an rseq critical section is first moved to its abort handler,
which its next preemption would do anyway (see _abort_rseq_critical_section).

Why not PTRACE_SINGLESTEP: its trap is a SIGTRAP forced on the task, and the kernel
resets the handler of a forced signal that is blocked or ignored to SIG_DFL, so a
target's own SIGTRAP handler would be gone. Why the final event stop: a task left
in a syscall (or signal-delivery) stop is sent SIGTRAP if its tracer dies, which
kills it; a task in an event stop just resumes.

Buffers the kernel writes into (sigaction, itimerval, stack_t...) live in a
scratch mapping the session creates in the task on first use and removes on
close; `read` and `write` go through /proc/TID/mem, which also reaches pages the
task itself may not write. `call_many` runs a list of calls as one batch from a few
instructions placed in that mapping: one stop for the batch instead of two per call.
Batches and the final event stop need PTRACE_INTERRUPT: a session opened in another
kind of stop (a TRACEME task's signal stop) runs its calls one by one and leaves the
task in the last call's syscall-exit stop.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import time

from checkpointer.errors import TargetError
from checkpointer.kernel import ptrace
from checkpointer.kernel.syscalls import NR_mmap, NR_munmap

_U64 = (1 << 64) - 1
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# mmap(2) constants for the scratch page.
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PROT_RWX = PROT_READ | PROT_WRITE | PROT_EXEC
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MAX_STOPS = 16  # entry, exit, and event stops (fork, clone, exec) of one syscall
SPIN = 200  # polls before sleeping: a syscall stop comes within microseconds

# call_many's code (x86_64, assembled from the source below), run in the task from the
# scratch area: rbx = the call table (64-byte entries: nr, 6 args, result), r12 = the
# number of calls, r13 = a done flag. It runs every call, stores each result, sets
# the flag, then sleeps in pause() (every signal is blocked) until interrupted: no
# stop at all until the last call, and no signal (int3's SIGTRAP would be forced).
#   loop: mov rax,[rbx]; mov rdi,[rbx+8]; mov rsi,[rbx+16]; mov rdx,[rbx+24]
#         mov r10,[rbx+32]; mov r8,[rbx+40]; mov r9,[rbx+48]; syscall
#         mov [rbx+56],rax; add rbx,64; dec r12; jnz loop; mov qword [r13],1
#   done: mov eax,34 (pause); syscall; jmp done
BATCH_CODE = bytes.fromhex(
    "488b03488b7b08488b7310488b53184c8b53204c8b43284c8b4b300f05488943384883c340"
    "49ffcc75d649c7450001000000b8220000000f05ebf7"
)
_CALL = struct.Struct("<8Q")  # a call table entry: nr, 6 args, result
_U64_STRUCT = struct.Struct("<Q")
# struct rseq: cpu_id_start, cpu_id (u32), then rseq_cs, the current critical
# section's descriptor: struct rseq_cs {u32 version, flags; u64 start_ip,
# post_commit_offset, abort_ip}.
RSEQ_CS_OFFSET = 8
RSEQ_CS = struct.Struct("<IIQQQ")
_HEAD = 128  # code (64 bytes), then the done flag (8), padded
MIN_BATCH = 2  # a single call runs faster alone (two stops, no code to write)
MAX_BATCH = 1024  # calls per batch in a scratch area of the session's own (64 KiB)


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
        self._scratch_owned = False  # mapped by this session: unmapped on close
        self._scratch_exec = False  # the scratch may hold call_many's code
        self._in_syscall_stop = False  # a call ran: the task waits in a syscall-exit stop
        self._interruptible = False  # opened in a PTRACE_EVENT_STOP (so: seized)
        self.events: list[tuple[int, int]] = []  # (PTRACE_EVENT_*, GETEVENTMSG) seen

    # -- lifetime ------------------------------------------------------------

    def __enter__(self) -> SyscallSession:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._saved = ptrace.get_regs(self.tid)
        self._abort_rseq_critical_section()
        self._saved_mask = ptrace.get_sigmask(self.tid)
        # Batches and the return to an event stop use PTRACE_INTERRUPT, which only a
        # seized task has; a task found in any other stop (a TRACEME seed's SIGSTOP)
        # gets its calls one by one and is left in the last one's syscall stop.
        self._interruptible = ptrace.in_event_stop(self.tid)
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
            if self._in_syscall_stop and self._interruptible:
                self._back_to_event_stop()
        except TargetError:
            pass  # the task is gone; nothing to give back
        finally:
            self._saved = None
            if self._mem >= 0:
                os.close(self._mem)
                self._mem = -1

    def _abort_rseq_critical_section(self) -> None:
        """A thread stopped inside an rseq critical section goes to its abort handler
        first, as the kernel would send it at its next preemption: our syscalls
        return to user space outside the section, where the kernel just clears the
        thread's rseq_cs, and the section would then run to its commit unguarded."""
        assert self._saved is not None
        rseq = ptrace.get_rseq_config(self.tid)
        if not rseq["ptr"]:
            return
        try:
            cs = _U64_STRUCT.unpack(self.read(rseq["ptr"] + RSEQ_CS_OFFSET, 8))[0]
            if not cs:
                return
            _version, _flags, start, length, abort = RSEQ_CS.unpack(self.read(cs, RSEQ_CS.size))
            if not start <= self._saved["rip"] < start + length:
                return
            if self.read(abort - 4, 4) != rseq["sig"].to_bytes(4, "little"):
                return  # the kernel would kill it for this; not ours to decide
        except OSError:
            return  # an area not mapped (a seed being rebuilt): nothing to abort
        self._saved["rip"] = abort
        ptrace.set_regs(self.tid, self._saved)
        self.write(rseq["ptr"] + RSEQ_CS_OFFSET, bytes(8))  # as the kernel clears it

    def _back_to_event_stop(self) -> None:
        """From the last call's syscall-exit stop into a PTRACE_EVENT_STOP, as the
        freezer left the task: the interrupt's trap is taken on the way out of the
        kernel, before any instruction of the task runs."""
        ptrace.interrupt(self.tid)
        ptrace.cont(self.tid)
        self._wait_event_stop()
        self._in_syscall_stop = False

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
        entered = False
        for _ in range(MAX_STOPS):
            ptrace.resume_to_syscall(self.tid)
            self._in_syscall_stop = True
            stop = ptrace.wait_stop(self.tid, 10.0, SPIN)
            if stop.kind in ("exited", "killed"):
                self._in_syscall_stop = False
                raise TargetError(f"task {self.tid} {stop.kind} during an injected syscall {nr}")
            if stop.event and stop.event != ptrace.PTRACE_EVENT_STOP:
                # fork/clone/exec event inside our syscall: note it, go on.
                self.events.append((stop.event, ptrace.get_event_msg(self.tid)))
                continue
            if stop.kind == "signal-stop" and stop.sig == signal.SIGTRAP:
                # A syscall stop (entry, then exit) reads as a SIGTRAP stop in our
                # syscall. (PTRACE_O_TRACESYSGOOD would mark it, but setting options
                # here would clobber the caller's.)
                after = ptrace.get_regs(self.tid)
                if after["rip"] == self.insn + 2 and after["orig_rax"] == nr:
                    if entered:
                        return after["rax"]
                    entered = True
            # Any other stop (a group-stop) came before our syscall ran: go on.
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
        self._gone()
        ptrace.cont(self.tid)
        while ptrace.wait_stop(self.tid, 10.0).kind not in ("exited", "killed"):
            ptrace.cont(self.tid)

    def die_of(self, sig: int) -> None:
        """Let the task be killed by `sig` (its default action): unblock it, send it,
        and pass it on at the signal stop; wait until the task is gone."""
        assert self._saved is not None, "session not open"
        self._gone()
        ptrace.set_sigmask(self.tid, 0)
        os.kill(self.tid, sig)
        ptrace.cont(self.tid)
        while (stop := ptrace.wait_stop(self.tid, 10.0)).kind not in ("exited", "killed"):
            ptrace.cont(self.tid, stop.sig if stop.kind == "signal-stop" else 0)

    def _gone(self) -> None:
        """The task is about to end: nothing to give back, unmap or stop again."""
        self._saved, self._scratch, self._in_syscall_stop = None, 0, False

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
        flags = MAP_SHARED | MAP_ANONYMOUS
        try:  # executable for call_many; refused under memory-deny-write-execute
            self._scratch = self.call(NR_mmap, near, size, PROT_RWX, flags, _U64, 0)
            self._scratch_exec = True
        except OSError:
            self._scratch = self.call(NR_mmap, near, size, PROT_READ | PROT_WRITE, flags, _U64, 0)
            self._scratch_exec = False
        self._scratch_size = size
        self._scratch_owned = True
        return self._scratch

    @property
    def scratch_area(self) -> tuple[int, int, bool]:
        """(address, size, executable) of the scratch area, (0, 0, False) if none."""
        return self._scratch, self._scratch_size, self._scratch_exec

    def adopt_scratch(
        self, addr: int, size: int, *, unmap_on_close: bool = False, executable: bool = False
    ) -> None:
        """Use an area mapped elsewhere: a restored process's threads share the one
        placed in a gap of the image; a dump lends every thread's session the
        scratch of its process's first session. Unmapped on close only if asked.
        executable: call_many may run code there (else it makes its calls one by one)."""
        self._scratch, self._scratch_size = addr, size
        self._scratch_owned = unmap_on_close
        self._scratch_exec = executable

    def call_many(
        self, calls: list[tuple], buf_size: int = 0, *, check: bool = True, data: bytes = b""
    ) -> tuple[list[int], bytes]:
        """Run syscalls (nr, *args) in order; return their results and the contents
        of a buffer of buf_size bytes after the last one. Arguments At(offset) stand
        for addresses in that buffer, which holds `data` (the calls' input: structs
        they read), zero-filled to buf_size, before the first call. A failing call
        raises OSError, after all of them ran (check=False: the raw results, errors
        as unsigned -errno, for the caller to tell which call failed).

        Two or more calls run as one batch: code in the scratch area makes them all
        while the task runs free, and one interrupt stops it afterwards (one stop
        instead of two per call). Without an executable scratch, one by one."""
        if not calls:
            return [], b""
        init = data.ljust(buf_size, b"\0")
        if len(calls) < MIN_BATCH:
            results, out = self._one_by_one(calls, init)
        else:
            results, out = self._batch(calls, init)
        if not check:
            return results, out
        for c, r in zip(calls, results, strict=True):
            if r >= (1 << 64) - 4095:
                err = (1 << 64) - r
                raise OSError(err, f"syscall {c[0]} in task {self.tid}: {os.strerror(err)}")
        return results, out

    def batch_room(self) -> int:
        """How many calls without a buffer one call_many batch can hold: an adopted
        scratch area has a fixed size; the session's own grows on demand."""
        if self._scratch and not self._scratch_owned:
            return max(1, (self._scratch_size - _HEAD) // _CALL.size)
        return MAX_BATCH

    def _one_by_one(self, calls: list[tuple], init: bytes) -> tuple[list[int], bytes]:
        buf_size = len(init)
        buf = self.scratch(buf_size) if buf_size else 0
        if buf_size:
            self.write(buf, init)
        results = [self.call_raw(*_resolve(c, buf)) for c in calls]
        return results, self.read(buf, buf_size) if buf_size else b""

    def _batch(self, calls: list[tuple], init: bytes) -> tuple[list[int], bytes]:
        assert self._saved is not None, "session not open"
        if not self._interruptible:
            return self._one_by_one(calls, init)
        buf_size = len(init)
        table_size = _CALL.size * len(calls)
        base = self.scratch(_HEAD + table_size + buf_size)
        if not self._scratch_exec:
            return self._one_by_one(calls, init)
        table, buf = base + _HEAD, base + _HEAD + table_size
        entries = b"".join(
            _CALL.pack(*(a & _U64 for a in _resolve(c, buf)), *(0,) * (7 - len(c)), 0)
            for c in calls
        )
        head = BATCH_CODE.ljust(64, b"\xcc") + bytes(_HEAD - 64)  # flag cleared
        self.write(base, head + entries + init)
        regs = dict(self._saved)
        regs.update(rip=base, rbx=table, r12=len(calls), r13=base + 64, orig_rax=_U64)
        ptrace.set_regs(self.tid, regs)
        ptrace.cont(self.tid)
        self._in_syscall_stop = False
        self._wait_for_flag(base + 64)
        ptrace.interrupt(self.tid)
        self._wait_event_stop()
        out = self.read(table, table_size + buf_size)
        results = [_CALL.unpack_from(out, i * _CALL.size)[7] for i in range(len(calls))]
        return results, out[table_size:]

    def _wait_for_flag(self, addr: int, timeout: float = 10.0) -> None:
        """Until the batch's done flag is set; a stop meanwhile (a group-stop) is
        resumed, the task's death reported."""
        deadline = time.monotonic() + timeout
        while self.read(addr, 8) == bytes(8):
            stop = ptrace.poll_stop(self.tid)
            if stop is not None:
                if stop.kind in ("exited", "killed"):
                    raise TargetError(f"task {self.tid} {stop.kind} during injected syscalls")
                ptrace.cont(self.tid)
            if time.monotonic() > deadline:
                raise TargetError(f"task {self.tid}: injected syscalls did not complete")
            os.sched_yield()

    def _wait_event_stop(self) -> None:
        for _ in range(MAX_STOPS):
            stop = ptrace.wait_stop(self.tid, 10.0, SPIN)
            if stop.kind in ("event-stop", "group-stop") and stop.event == ptrace.PTRACE_EVENT_STOP:
                return
            if stop.kind in ("exited", "killed"):
                raise TargetError(f"task {self.tid} {stop.kind} during injected syscalls")
            # A stop before the trap (signals are blocked, so a forced one): go on.
            ptrace.cont(self.tid, stop.sig if stop.kind == "signal-stop" else 0)
        raise TargetError(f"task {self.tid} did not return to an event stop")

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


def _resolve(call: tuple, buf: int) -> tuple:
    """A call (nr, *args) with its At(offset) arguments turned into addresses."""
    return tuple(buf + a.offset if isinstance(a, At) else a for a in call)
