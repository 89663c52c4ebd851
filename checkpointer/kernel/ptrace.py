"""Raw ptrace for freezing a task tree, reading its CPU state and injecting syscalls.

Built on python-ptrace's binding layer only (the raw `ptrace()` call and its
`user_regs_struct`): its debugger/attach path uses PTRACE_ATTACH, which sends
SIGSTOP and would change the target's job-control state. PTRACE_SEIZE does not.

Facts this module relies on (kernel 6.18, x86_64, see also tests/test_kernel_ptrace.py):
- A SEIZE'd task reports every stop as PTRACE_EVENT_STOP (status >> 16 == 128):
  WSTOPSIG is SIGTRAP for a PTRACE_INTERRUPT stop and the stop signal
  (SIGSTOP/SIGTSTP/SIGTTIN/SIGTTOU) for a group-stop.
- Seizing a task that is already group-stopped makes it report a group-stop trap
  by itself (no PTRACE_INTERRUPT needed); detaching puts it back in group-stop.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from typing import NamedTuple

from ptrace.binding.func import ptrace as _raw_ptrace
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

from checkpointer.errors import TargetError
from checkpointer.kernel import proc

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_SYSCALL = 24
PTRACE_GETREGS = 12
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
# PTRACE_SETOPTIONS bits
PTRACE_O_TRACEFORK = 1 << 1
PTRACE_O_TRACECLONE = 1 << 3
PTRACE_O_EXITKILL = 1 << 20
PTRACE_O_SUSPEND_SECCOMP = 1 << 21  # injected syscalls bypass the tracee's seccomp filters
NT_X86_XSTATE = 0x202

__WALL = 0x40000000  # wait for threads too (not exported by Python's os)

STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
REG_NAMES: tuple[str, ...] = tuple(name for name, _ in user_regs_struct._fields_)

# XSAVE area: 64 KiB is far above any x86 xstate size today (AMX: ~11 KiB); the
# kernel shortens iov_len to what it filled, so only that many bytes are returned.
_XSTATE_BUF_SIZE = 64 * 1024
_U64 = (1 << 64) - 1


class Stop(NamedTuple):
    """A decoded waitpid() status.

    kind: "event-stop"  PTRACE_EVENT_STOP from PTRACE_INTERRUPT (sig SIGTRAP) or another
                        ptrace event (event != 128)
          "group-stop"  PTRACE_EVENT_STOP with a stop signal: the task's group is stopped
          "signal-stop" signal-delivery-stop: `sig` was about to be delivered; resume with
                        cont/detach(tid, sig) to deliver it, or it is lost
          "exited"      sig = exit status
          "killed"      sig = the killing signal
    event: status >> 16 (PTRACE_EVENT_*), 0 if none. status: the raw waitpid status.
    """

    kind: str
    sig: int
    event: int
    status: int = 0


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _ptrace(cmd: int, tid: int, addr: int = 0, data: int = 0, what: str = "ptrace") -> int:
    """One raw ptrace call; ESRCH becomes TargetError, other errors OSError."""
    try:
        return _raw_ptrace(cmd, tid, addr, data)
    except PtraceError as exc:
        err = exc.errno or errno.EIO
        if err == errno.ESRCH:
            # ESRCH also means "exists but is not stopped under us": say both.
            if os.path.exists(f"/proc/{tid}"):
                raise TargetError(
                    f"{what}: process {tid} is not stopped under our ptrace"
                ) from None
            raise TargetError(f"process {tid} does not exist (exited)") from None
        raise OSError(err, f"{what}({tid}): {os.strerror(err)}") from None


def _tracer_of(tid: int) -> tuple[int, str]:
    """TracerPid of tid and that tracer's comm (0, "" if not traced or unreadable)."""
    try:
        tracer = proc.tracer_pid(tid)
    except TargetError:
        return 0, ""
    if not tracer:
        return 0, ""
    try:
        return tracer, proc.read_comm(tracer)
    except TargetError:
        return tracer, "?"


def seize(tid: int, options: int = 0) -> None:
    """PTRACE_SEIZE (with PTRACE_O_* options): the task keeps running, no SIGSTOP."""
    try:
        _raw_ptrace(PTRACE_SEIZE, tid, 0, options)
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TargetError(f"process {tid} does not exist (exited)") from None
        if exc.errno == errno.EPERM:
            tracer, comm = _tracer_of(tid)
            if tracer:
                raise TargetError(
                    f"cannot seize process {tid}: already traced by PID {tracer} ({comm})"
                ) from None
            if not os.path.exists(f"/proc/{tid}"):
                raise TargetError(f"process {tid} does not exist (exited)") from None
            raise TargetError(
                f"cannot seize process {tid}: permission denied "
                "(ptrace_scope / not root / target not dumpable / kernel thread)"
            ) from None
        raise OSError(exc.errno, f"PTRACE_SEIZE({tid}): {os.strerror(exc.errno or 0)}") from None


def check_seizable(pid: int, tids: list[int]) -> None:
    """Raise the TargetError `seize` would for a thread of pid, without seizing it: a
    thread traced by another (named), or a process we may not trace (its
    /proc/PID/mem is refused by the same ptrace access check, ptrace_scope
    included). A thread or process that exited meanwhile passes."""
    for tid in tids:
        tracer, comm = _tracer_of(tid)
        if tracer and tracer != os.getpid():
            raise TargetError(
                f"cannot seize process {tid}: already traced by PID {tracer} ({comm})"
            )
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC))
    except PermissionError:
        raise TargetError(
            f"cannot seize process {pid}: permission denied "
            "(ptrace_scope / not root / target not dumpable / kernel thread)"
        ) from None
    except (FileNotFoundError, ProcessLookupError):
        pass


def interrupt(tid: int) -> None:
    """PTRACE_INTERRUPT: ask a seized task to enter an event-stop (asynchronous)."""
    _ptrace(PTRACE_INTERRUPT, tid, what="PTRACE_INTERRUPT")


def detach(tid: int, sig: int = 0) -> None:
    """PTRACE_DETACH, delivering `sig` (a signal-stop's signal) on the way out."""
    _ptrace(PTRACE_DETACH, tid, 0, sig, what="PTRACE_DETACH")


def cont(tid: int, sig: int = 0) -> None:
    """PTRACE_CONT, delivering `sig`."""
    _ptrace(PTRACE_CONT, tid, 0, sig, what="PTRACE_CONT")


def set_options(tid: int, options: int) -> None:
    """PTRACE_SETOPTIONS (PTRACE_O_*)."""
    _ptrace(PTRACE_SETOPTIONS, tid, 0, options, what="PTRACE_SETOPTIONS")


def get_event_msg(tid: int) -> int:
    """PTRACE_GETEVENTMSG: the new pid of a fork/clone event stop."""
    msg = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg), what="PTRACE_GETEVENTMSG")
    return msg.value


def singlestep(tid: int, sig: int = 0) -> None:
    """PTRACE_SINGLESTEP: run one instruction, then report a SIGTRAP signal-stop."""
    _ptrace(PTRACE_SINGLESTEP, tid, 0, sig, what="PTRACE_SINGLESTEP")


_siginfo = ctypes.create_string_buffer(128)


def in_event_stop(tid: int) -> bool:
    """Is the stopped task in a PTRACE_EVENT_STOP (an interrupt or group-stop of a
    seized task), rather than a signal-delivery, syscall or other event stop?
    (PTRACE_GETSIGINFO: such a stop's si_code is sig | PTRACE_EVENT_STOP << 8.)"""
    _ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(_siginfo), what="PTRACE_GETSIGINFO")
    si_code = int.from_bytes(_siginfo.raw[8:12], "little", signed=True)
    return si_code >> 8 == PTRACE_EVENT_STOP


def resume_to_syscall(tid: int) -> None:
    """PTRACE_SYSCALL: run to the next syscall entry or exit, and stop there (no
    signal is sent, unlike a single step's SIGTRAP)."""
    _ptrace(PTRACE_SYSCALL, tid, 0, 0, what="PTRACE_SYSCALL")


def decode_status(status: int) -> Stop:
    """Turn a waitpid() status into a Stop (see Stop for the kinds)."""
    if os.WIFEXITED(status):
        return Stop("exited", os.WEXITSTATUS(status), 0, status)
    if os.WIFSIGNALED(status):
        return Stop("killed", os.WTERMSIG(status), 0, status)
    sig = os.WSTOPSIG(status)
    event = (status >> 16) & 0xFF
    if event == PTRACE_EVENT_STOP:
        return Stop("group-stop" if sig in STOP_SIGNALS else "event-stop", sig, event, status)
    if event:
        return Stop("event-stop", sig, event, status)
    return Stop("signal-stop", sig, 0, status)


def poll_stop(tid: int) -> Stop | None:
    """One waitpid(tid, WNOHANG|__WALL): the stop it reports, or None."""
    try:
        pid, status = os.waitpid(tid, os.WNOHANG | __WALL)
    except ChildProcessError:
        raise TargetError(f"process {tid} is not traced by us (or already reaped)") from None
    return decode_status(status) if pid else None


def wait_stop(tid: int, timeout: float = 5.0, spin: int = 0) -> Stop:
    """waitpid(tid, __WALL) until it reports, polling so a lost stop cannot hang us.

    spin: polls with only a sched_yield between them before the first sleep, for a
    stop due within microseconds (an injected syscall's): the shortest sleep costs
    ~60 µs, several times the stop itself.
    Raises TargetError if nothing is reported within `timeout` seconds, or if tid is
    not our tracee/child (ECHILD).
    """
    deadline = time.monotonic() + timeout
    delay = 0.00002
    while True:
        stop = poll_stop(tid)
        if stop is not None:
            return stop
        if spin > 0:
            spin -= 1
            os.sched_yield()
            continue
        if time.monotonic() >= deadline:
            raise TargetError(f"process {tid} did not stop within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def get_regs(tid: int) -> dict[str, int]:
    """PTRACE_GETREGS: the user_regs_struct as {name: unsigned 64-bit int}.

    Includes fs_base, gs_base and orig_rax (orig_rax is 2**64-1 when not in a syscall).
    """
    regs = user_regs_struct()
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs), what="PTRACE_GETREGS")
    return {name: getattr(regs, name) for name in REG_NAMES}


def set_regs(tid: int, regs: dict[str, int]) -> None:
    """PTRACE_SETREGS from a full {name: int} dict (negative values are taken mod 2**64)."""
    raw = user_regs_struct()
    for name in REG_NAMES:
        setattr(raw, name, regs[name] & _U64)
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(raw), what="PTRACE_SETREGS")


_xstate_buf = ctypes.create_string_buffer(_XSTATE_BUF_SIZE)


def get_xstate(tid: int) -> bytes:
    """PTRACE_GETREGSET NT_X86_XSTATE: the XSAVE area (legacy FXSAVE + header + extended)."""
    iov = _Iovec(ctypes.addressof(_xstate_buf), _XSTATE_BUF_SIZE)
    _ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov), what="GETREGSET")
    return _xstate_buf.raw[: iov.iov_len]


def set_xstate(tid: int, blob: bytes) -> None:
    """PTRACE_SETREGSET NT_X86_XSTATE: the whole XSAVE area (the kernel wants its
    full size; a shorter blob fails with EFAULT)."""
    buf = ctypes.create_string_buffer(bytes(blob), len(blob))
    iov = _Iovec(ctypes.addressof(buf), len(blob))
    _ptrace(PTRACE_SETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov), what="SETREGSET")


class RseqConfig(ctypes.Structure):
    """struct ptrace_rseq_configuration (24 bytes)."""

    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def get_rseq_config(tid: int) -> dict[str, int]:
    """PTRACE_GET_RSEQ_CONFIGURATION: {ptr, size, sig}; ptr 0 = no rseq area."""
    cfg = RseqConfig()
    _ptrace(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        ctypes.sizeof(cfg),
        ctypes.addressof(cfg),
        what="PTRACE_GET_RSEQ_CONFIGURATION",
    )
    return {"ptr": cfg.rseq_abi_pointer, "size": cfg.rseq_abi_size, "sig": cfg.signature}


SIGINFO_SIZE = 128


class _PeekSiginfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


class SeccompMetadata(ctypes.Structure):
    """struct seccomp_metadata: which filter (0: the newest) and its flags."""

    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def seccomp_filters(tid: int) -> list[tuple[bytes, int]]:
    """The thread's seccomp filters, oldest first: (its BPF program, struct
    sock_filter[] bytes; its SECCOMP_FILTER_FLAG_* flags). Needs CAP_SYS_ADMIN."""
    filters = []
    while True:
        index = len(filters)
        try:
            count = _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0, what="SECCOMP_GET_FILTER")
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # past the oldest
                return filters[::-1]
            raise
        prog = ctypes.create_string_buffer(count * 8)
        _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(prog),
                what="SECCOMP_GET_FILTER")  # fmt: skip
        meta = SeccompMetadata(filter_off=index)
        _ptrace(PTRACE_SECCOMP_GET_METADATA, tid, ctypes.sizeof(meta), ctypes.addressof(meta),
                what="SECCOMP_GET_METADATA")  # fmt: skip
        filters.append((prog.raw, meta.flags))


def peek_siginfo(tid: int, shared: bool) -> list[bytes]:
    """PTRACE_PEEKSIGINFO: the queued siginfos (128 bytes each) of the thread's
    private queue, or of the process-wide queue with shared=True, not consumed."""
    out: list[bytes] = []
    batch = 32
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
    while True:
        args = _PeekSiginfoArgs(len(out), 1 if shared else 0, batch)
        n = _ptrace(
            PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf), "PEEKSIGINFO"
        )
        out += [buf.raw[i * SIGINFO_SIZE : (i + 1) * SIGINFO_SIZE] for i in range(n)]
        if n < batch:
            return out


def get_sigmask(tid: int) -> int:
    """PTRACE_GETSIGMASK: the thread's blocked-signal mask (bit n-1 = signal n)."""
    mask = ctypes.c_uint64()
    _ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask), what="PTRACE_GETSIGMASK")
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    """PTRACE_SETSIGMASK (SIGKILL/SIGSTOP are silently never blocked)."""
    cmask = ctypes.c_uint64(mask & _U64)
    _ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(cmask), what="PTRACE_SETSIGMASK")


# --- syscall injection -------------------------------------------------------

_syscall_insn: dict[int, int] = {}  # tid -> address of a `syscall` (0f 05) in its [vdso]


def _read_mem(tid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{tid}/mem", "rb", buffering=0) as mem:
        return os.pread(mem.fileno(), size, addr)


def find_syscall_insn(tid: int) -> int:
    """Address of a `syscall` instruction (0f 05) in the task's [vdso], cached per tid.

    Single-stepping from any address whose bytes are 0f 05 executes a syscall, so the
    bytes need not be an instruction boundary of the vdso's own code. The cache entry is
    re-checked by reading the two bytes (cheap), which catches pid reuse and exec.
    """
    addr = _syscall_insn.get(tid)
    try:
        try:
            if addr is not None and _read_mem(tid, addr, 2) == b"\x0f\x05":
                return addr
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            # unmapped: the process ran exec since (or it is another one); look again
        with open(f"/proc/{tid}/maps", "rb") as f:
            for line in f:
                if line.rstrip().endswith(b"[vdso]"):
                    lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split(b"-"))
                    break
            else:
                raise TargetError(f"process {tid} has no [vdso] to inject a syscall from")
        off = _read_mem(tid, lo, hi - lo).find(b"\x0f\x05")
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"process {tid} does not exist (exited)") from None
    if off < 0:
        raise TargetError(f"process {tid}: no syscall instruction in its [vdso]")
    _syscall_insn[tid] = lo + off
    return lo + off


def inject_syscall(tid: int, nr: int, *args: int) -> int:
    """Run syscall `nr(args...)` inside task `tid`, which must be in a ptrace stop.

    Returns the syscall's result (unsigned); raises OSError(-result) if it failed.
    The task's registers and signal mask are restored exactly, so a syscall it was
    blocked in (read, nanosleep...) is restarted as usual when it is resumed, and it
    is left in a PTRACE_EVENT_STOP. One call is one SyscallSession (inject.py), which
    runs it to syscall stops: a single step would force a SIGTRAP on the task,
    resetting its own SIGTRAP handler.
    Do not call it on a task in a signal-delivery-stop whose signal you still want:
    its delivery is decided by the sig of your next cont/detach, not by this call.
    """
    from checkpointer.kernel.inject import SyscallSession  # inject.py builds on this module

    with SyscallSession(tid) as session:
        return session.call(nr, *args)


HOLD_ALL = (1 << 64) - 1  # a signal mask holding everything (KILL and STOP cannot be)


def give_back_masks_in_group_stop(masks: dict[int, int], timeout: float = 5.0) -> None:
    """Set each thread's signal mask while it stays in a group-stop.

    For leaving a tree stopped exactly as it was read: its threads are detached
    holding every signal with a SIGSTOP queued, so they stop before running an
    instruction (a pending signal with a handler would otherwise be handled
    first, writing a frame on a stack). Then each one is seized again, which a
    group-stopped task reports by itself, given its real mask, and detached,
    which leaves it in the group-stop.
    """
    deadline = time.monotonic() + timeout
    for tid, mask in masks.items():
        while proc.read_state(tid) not in ("T", "Z", "X"):
            if time.monotonic() > deadline:
                raise TargetError(f"thread {tid} did not stop")
            time.sleep(0.001)
        seize(tid)
        while (stop := wait_stop(tid, timeout)).kind != "group-stop":
            if stop.kind in ("exited", "killed"):
                break
            cont(tid, stop.sig if stop.kind == "signal-stop" else 0)
        else:
            set_sigmask(tid, mask)
            detach(tid)
