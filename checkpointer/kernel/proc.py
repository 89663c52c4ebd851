"""Small readers of /proc/PID/*, each named after what it reads; plain data out.

A process that does not exist (or exits while being read) raises TargetError.
Readers take a pid; the per-thread ones read /proc/PID/task/TID/*.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from checkpointer.errors import TargetError
from checkpointer.kernel.syscalls import libc

_GONE = (FileNotFoundError, ProcessLookupError)


def _gone(pid: int) -> TargetError:
    return TargetError(f"process {pid} does not exist (exited)")


def _read_bytes(pid: int, path: str, chunk_size: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(chunk_size):
                chunks.append(chunk)
            return b"".join(chunks)
    except _GONE:
        raise _gone(pid) from None
    except OSError as exc:
        # /proc files of a dying process can fail with ESRCH-like EIO/EINVAL mid-read.
        if not os.path.exists(f"/proc/{pid}"):
            raise _gone(pid) from None
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None


def task_dir(pid: int) -> str:
    """The /proc directory that shows pid's memory and files: /proc/PID, or, when the
    thread-group leader has exited while other threads run (pthread_exit in
    main), a live thread's task directory: the zombie leader's own maps are
    empty and its mem, auxv and pagemap have no mm behind them."""
    pinned = _pinned_task_dirs.get(pid)
    if pinned is not None:
        return pinned
    tid = live_tid(pid)
    return f"/proc/{pid}" if tid == pid else f"/proc/{pid}/task/{tid}"


# task_dir of the processes of a frozen tree. Asking costs a read of the leader's
# stat before every /proc path, a millisecond each under emulation; a frozen task
# cannot exit (only SIGKILL ends it, and then every path fails alike), so the
# answer holds until the thaw. Pinned and unpinned by the freezer.
_pinned_task_dirs: dict[int, str] = {}


def pin_task_dirs(pids: Iterable[int]) -> None:
    """Remember task_dir of each pid until unpin_task_dirs (a frozen tree). One
    killed meanwhile is left unpinned: its paths fail as they would have."""
    pids = list(pids)
    unpin_task_dirs(pids)
    for pid in pids:
        try:
            _pinned_task_dirs[pid] = task_dir(pid)
        except TargetError:
            continue


def unpin_task_dirs(pids: Iterable[int]) -> None:
    for pid in pids:
        _pinned_task_dirs.pop(pid, None)


def live_tid(pid: int) -> int:
    """A thread of pid that has not exited: pid itself, unless the main thread
    called pthread_exit while others run on (then the first other one)."""
    if read_state(pid) not in ("Z", "X"):
        return pid
    for tid in list_threads(pid):
        try:
            if tid != pid and read_state(pid, tid) not in ("Z", "X"):
                return tid
        except TargetError:
            continue
    return pid


def _read_text(pid: int, path: str) -> str:
    return _read_bytes(pid, path).decode("utf-8", "surrogateescape")


def _listdir(pid: int, path: str) -> list[str]:
    try:
        return os.listdir(path)
    except _GONE:
        raise _gone(pid) from None


def exists(pid: int) -> bool:
    """Is there a process (or thread) pid that has not been reaped (zombies count)?"""
    return os.path.exists(f"/proc/{pid}")


PF_KTHREAD = 0x00200000  # task flag (stat field 9): a kernel thread


def require_process(pid: int) -> None:
    """Refuse, with the line a user needs, a PID that names no process a dump can
    take: none at all, a thread other than a process's main one (/proc lists every
    TID too, unlisted), a kernel thread, or a zombie (whose main thread alone is not
    one: it may have called pthread_exit while others run on)."""
    if pid <= 0 or not exists(pid):
        raise TargetError(f"no process {pid}")
    try:
        tgid = int(read_status(pid)["Tgid"])
        st = read_stat(pid)
        zombie = read_state(pid, live_tid(pid)) in ("Z", "X")
    except TargetError:
        raise TargetError(f"no process {pid}") from None
    if tgid != pid:
        raise TargetError(f"{pid} is a thread of process {tgid}; give the process's PID")
    if st.flags & PF_KTHREAD:
        raise TargetError(f"process {pid} is a kernel thread")
    if zombie:
        raise TargetError(
            f"process {pid} has exited; it is a zombie that its parent {st.ppid} has not reaped"
        )


def _every_stat() -> Iterator[ProcStat]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                yield read_stat(int(name))
            except TargetError:
                continue


def sessions_and_groups_in_use() -> set[int]:
    """Every session and process group id some process has now. Such an id stays
    taken after its leader exits: no new process can get it as its PID."""
    ids: set[int] = set()
    for st in _every_stat():
        ids.update((st.pgrp, st.session))
    return ids


def members_of(ids: set[int]) -> list[ProcStat]:
    """Every process (zombies too) whose process group or session is one of `ids`."""
    return [st for st in _every_stat() if st.pgrp in ids or st.session in ids]


# --- tasks and children ---------------------------------------------------------


def list_threads(pid: int) -> list[int]:
    """Thread ids of pid, sorted (the main thread == pid first)."""
    return sorted(int(t) for t in _listdir(pid, f"/proc/{pid}/task"))


def list_children(pid: int) -> list[int]:
    """Children of every thread of pid (task/*/children; CONFIG_PROC_CHILDREN)."""
    kids: list[int] = []
    for tid in list_threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(x) for x in f.read().split())
        except _GONE:
            continue  # that thread just exited; its children are reparented
    if not os.path.exists(f"/proc/{pid}"):
        raise _gone(pid)
    return sorted(set(kids))


# --- stat --------------------------------------------------------------------------


class ProcStat(NamedTuple):
    """/proc/PID/stat (see proc(5)); brk is the end of the [heap] VMA (see read_brk)."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    flags: int
    num_threads: int
    starttime: int  # clock ticks since boot (field 22): identifies the process across reuse
    vsize: int
    rss: int
    start_code: int  # field 26
    end_code: int  # 27
    start_stack: int  # 28
    start_data: int  # 45
    end_data: int  # 46
    start_brk: int  # 47
    arg_start: int  # 48
    arg_end: int  # 49
    env_start: int  # 50
    env_end: int  # 51
    exit_code: int  # 52
    brk: int  # not in stat: end of [heap], or start_brk without a heap; -1 if not asked
    tpgid: int = -1  # field 8: foreground process group of the controlling terminal


def parse_stat(pid: int, data: bytes) -> ProcStat:
    """Parse a stat line; comm may contain spaces and ')' so split on the LAST ')'."""
    lparen = data.index(b"(")
    rparen = data.rindex(b")")
    comm = data[lparen + 1 : rparen].decode("utf-8", "surrogateescape")
    f = data[rparen + 2 :].split()
    # f[0] is field 3 (state): field n is f[n - 3].

    def n(i: int) -> int:
        return int(f[i - 3]) if len(f) > i - 3 else 0

    return ProcStat(
        pid=int(data[:lparen]),
        comm=comm,
        state=f[0].decode(),
        ppid=n(4),
        pgrp=n(5),
        session=n(6),
        tty_nr=n(7),
        flags=n(9),
        num_threads=n(20),
        starttime=n(22),
        vsize=n(23),
        rss=n(24),
        start_code=n(26),
        end_code=n(27),
        start_stack=n(28),
        start_data=n(45),
        end_data=n(46),
        start_brk=n(47),
        arg_start=n(48),
        arg_end=n(49),
        env_start=n(50),
        env_end=n(51),
        exit_code=n(52),
        brk=-1,
        tpgid=n(8),
    )


def read_stat(pid: int, tid: int | None = None, *, brk: bool = False) -> ProcStat:
    """/proc/PID/stat (or task/TID/stat). brk=True also reads maps for the [heap] end
    (brk is -1 otherwise)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    st = parse_stat(pid, _read_bytes(pid, path))
    if brk:
        st = st._replace(brk=read_brk(pid, st.start_brk))
    return st


def read_state(pid: int, tid: int | None = None) -> str:
    """Just the one-letter state from stat (R, S, D, T, t, Z, X...), without parsing
    the rest: task_dir asks it before every per-fd /proc path."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    data = _read_bytes(pid, path)
    at = data.rindex(b")") + 2  # comm may hold ")": the last one ends it
    return data[at : at + 1].decode()


PF_EXITING = 0x4  # task flag (stat field 9): in do_exit


def wait_exited(pid: int, tid: int | None = None, timeout: float = 0.2) -> bool:
    """Is the process (or its thread tid) gone or dying: exiting, a zombie, dead?

    Waits up to `timeout` for it to show. A task in exit already refuses ptrace
    (EPERM); it shows PF_EXITING at once, but stays "R" while the kernel frees its
    memory, which takes seconds for gigabytes, before /proc calls it a zombie.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _exiting(pid, tid):
                return True
        except TargetError:
            return True  # reaped
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def tearing_down(pid: int) -> bool:
    """Is the process exiting but not yet a zombie (its memory being freed)?"""
    try:
        st = read_stat(pid)
        return st.state not in ("Z", "X") and bool(st.flags & PF_EXITING) and _exiting(pid, None)
    except TargetError:
        return False


def _exiting(pid: int, tid: int | None) -> bool:
    st = read_stat(pid, tid)
    if st.state not in ("Z", "X") and not st.flags & PF_EXITING:
        return False
    if tid is not None:
        return True
    # A main thread that called pthread_exit alone does not end the process.
    live = live_tid(pid)
    return live == pid or bool(read_stat(pid, live).flags & PF_EXITING)


def read_brk(pid: int, start_brk: int | None = None) -> int:
    """The program break as visible from outside: the end of the [heap] VMA.

    The kernel's exact mm->brk is not exported in /proc; the VMA end is it rounded up
    to a page. Exact value: inject_syscall(tid, NR_brk, 0) in a stopped thread.
    Without a [heap] VMA (brk never grown) this is start_brk.
    """
    data = _read_bytes(pid, f"{task_dir(pid)}/maps")
    i = data.find(b" [heap]\n")
    if i < 0:
        if start_brk is None:
            start_brk = read_stat(pid).start_brk
        return start_brk
    line = data[data.rfind(b"\n", 0, i) + 1 : i]
    return int(line[line.index(b"-") + 1 : line.index(b" ")], 16)


# --- status ---------------------------------------------------------------------------


def read_status(pid: int, tid: int | None = None) -> dict[str, str]:
    """/proc/PID/status (or task/TID/status) as {key: value} (value stripped)."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    out: dict[str, str] = {}
    for line in _read_text(pid, path).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


class TaskStatus:
    """One read of a task's status file, with the fields the dump takes from it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields

    @property
    def state(self) -> str:
        """The one-letter state (as in stat: R, S, D, T, t, Z, X...)."""
        return self.fields.get("State", "X")[:1]

    @property
    def creds(self) -> dict:
        """uid/gid [real, effective, saved, fs], groups, cap_* bitmasks (ints)."""
        st = self.fields
        return {
            "uid": [int(x) for x in st["Uid"].split()],
            "gid": [int(x) for x in st["Gid"].split()],
            "groups": [int(x) for x in st.get("Groups", "").split()],
            "cap_inh": int(st["CapInh"], 16),
            "cap_prm": int(st["CapPrm"], 16),
            "cap_eff": int(st["CapEff"], 16),
            "cap_bnd": int(st["CapBnd"], 16),
            "cap_amb": int(st.get("CapAmb", "0"), 16),
        }

    @property
    def signal_masks(self) -> dict[str, int]:
        """Per-thread blocked/pending, process-wide shared_pending/sigignore/sigcatch."""
        st = self.fields
        return {
            "blocked": int(st["SigBlk"], 16),
            "pending": int(st["SigPnd"], 16),
            "shared_pending": int(st["ShdPnd"], 16),
            "sigignore": int(st["SigIgn"], 16),
            "sigcatch": int(st["SigCgt"], 16),
        }

    @property
    def umask(self) -> int:
        """The file mode creation mask (a zombie main thread has none: KeyError)."""
        return int(self.fields["Umask"], 8)

    @property
    def seccomp_mode(self) -> int:
        """0 none, 1 strict, 2 filter."""
        return int(self.fields.get("Seccomp", "0"))


def read_task_status(pid: int, tid: int | None = None) -> TaskStatus:
    return TaskStatus(read_status(pid, tid))


def tracer_pid(pid: int) -> int:
    """TracerPid from status: 0 when nobody ptraces pid."""
    return int(read_status(pid).get("TracerPid", "0"))


def read_creds(pid: int) -> dict:
    """uid/gid [real, effective, saved, fs], groups, cap_* bitmasks (ints)."""
    return read_task_status(pid).creds


def read_signal_masks(pid: int, tid: int) -> dict[str, int]:
    """Per-thread blocked/pending, process-wide shared_pending/sigignore/sigcatch."""
    return read_task_status(pid, tid).signal_masks


# --- maps and smaps -----------------------------------------------------------------


class MapEntry(NamedTuple):
    """One /proc/PID/maps line. path has " (deleted)" removed; `deleted` says it was there."""

    start: int
    end: int
    prot: str  # "rwxp" / "rw-s"
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str  # "" for anonymous; "[heap]", "[stack]", "[vdso]", "/path with spaces"...
    deleted: bool = False


_DELETED = " (deleted)"


def parse_maps(data: bytes) -> list[MapEntry]:
    out = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        parts = line.split(None, 5)  # the 6th part keeps the spaces of the path
        rng, prot, off, dev, ino = parts[:5]
        path = parts[5] if len(parts) > 5 else ""
        deleted = path.endswith(_DELETED) and not path.startswith("[")
        if deleted:
            path = path[: -len(_DELETED)]
        lo, _, hi = rng.partition("-")
        out.append(
            MapEntry(int(lo, 16), int(hi, 16), prot, int(off, 16), dev, int(ino), path, deleted)
        )
    return out


def read_maps(pid: int) -> list[MapEntry]:
    return parse_maps(_read_bytes(pid, f"{task_dir(pid)}/maps"))


def read_smaps_vmflags(pid: int) -> dict[int, list[str]]:
    """{VMA start: VmFlags list} from /proc/PID/smaps ('uw' = uffd-wp registered)."""
    return {start: flags for start, _end, flags in read_smaps_vmas(pid)}


def read_smaps_vmas(pid: int) -> list[tuple[int, int, list[str]]]:
    """[(start, end, VmFlags list)] of every VMA, in address order, from smaps."""
    data = _read_bytes(pid, f"{task_dir(pid)}/smaps", _SMAPS_READ)
    return [
        (int(start, 16), int(end, 16), flags.decode().split())
        for start, end, flags in _SMAPS_FLAGS.findall(data)
    ]


# Bytes asked for per read of smaps. A read of a seq_file fills the kernel's page-sized
# buffer with records until it holds what was asked for; a record that overflows the
# buffer is thrown away and made again by the next read. A smaps record is a walk of
# its VMA's page tables (~10 ms per resident GiB), so a big VMA at a buffer's end cost
# its walk twice: 23 ms instead of 11 ms for a 1 GiB target, in the final dump's window.
# Asked for about one record (they are ~700-1100 bytes), the kernel stops after one or
# two, which fit its buffer, and makes each once. (Smaller reads cost syscalls: with
# 20,000 VMAs 74 ms at 512 bytes, 59 ms at 1024, 52 ms at 1 MiB.)
_SMAPS_READ = 1024

# A VMA's header line (it starts with its hex range), then its field lines (none
# starts like a range) up to VmFlags. Matched in C: the final dump checks these
# flags while the tree is frozen, and a Python loop over every line of smaps cost
# more than the kernel's walk behind it.
_SMAPS_FLAGS = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) [^\n]*\n(?:(?![0-9a-f]+-)[^\n]*\n)*?VmFlags:([^\n]*)", re.M
)


# --- misc -------------------------------------------------------------------------------


def read_auxv(pid: int) -> bytes:
    """/proc/PID/auxv raw (pairs of native u64, AT_NULL terminated)."""
    return _read_bytes(pid, f"{task_dir(pid)}/auxv")


def read_link(pid: int, name: str) -> str | None:
    """readlink /proc/PID/<name> (exe, cwd, root, fd/N); None if it has no target."""
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except _GONE:
        if not os.path.exists(f"/proc/{pid}"):
            raise _gone(pid) from None
        return None
    except PermissionError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EINVAL):
            return None
        raise


_NOTIFY = {"signal": 0, "none": 1, "thread": 2}


def read_posix_timers(pid: int) -> list[dict]:
    """The process's POSIX timers (timer_create) from /proc/PID/timers:
    [{id, clock, signo, sigval, notify, target}], notify as sigev_notify
    (SIGEV_THREAD_ID included), target the pid or tid it signals."""
    timers: list[dict] = []
    for line in _read_text(pid, f"/proc/{pid}/timers").splitlines():
        key, _, value = line.partition(": ")
        if key == "ID":
            timers.append({"id": int(value)})
        elif key == "signal":
            signo, _, sigval = value.partition("/")
            timers[-1].update(signo=int(signo), sigval=int(sigval, 16))
        elif key == "notify":
            kind, _, target = value.partition("/")  # "signal/pid.123", "thread/tid.124"
            who, _, number = target.partition(".")
            timers[-1].update(
                notify=_NOTIFY.get(kind, 0) | (4 if who == "tid" else 0), target=int(number)
            )
        elif key == "ClockID":
            timers[-1]["clock"] = int(value)
    return timers


NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time",
              "time_for_children", "user", "uts")  # fmt: skip


def read_namespaces(pid: int) -> dict[str, str]:
    """{kind: "net:[4026531833]", ...} from /proc/PID/ns, through a live thread (a
    main thread that called pthread_exit shows none). Each link is read by name:
    listing the directory needs the process to be dumpable, reading a link does
    not. Kinds this kernel lacks are left out."""
    where = f"{task_dir(pid)}/ns"
    out = {}
    for kind in NAMESPACES:
        try:
            out[kind] = os.readlink(f"{where}/{kind}")
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise _gone(pid) from None
    return out


class FileLock(NamedTuple):
    kind: str  # "flock", "posix", "ofd"; or what fdinfo calls another ("LEASE"...)
    write: bool
    start: int
    end: int | None  # last byte; None: to the end of the file, however long


class FdInfo(NamedTuple):
    fd: int
    target: str  # readlink of /proc/PID/fd/N: "/path", "pipe:[123]", "anon_inode:[userfaultfd]"
    pos: int
    flags: int  # open flags (fdinfo prints them in octal)
    mnt_id: int
    locks: tuple[FileLock, ...] = ()  # held through this fd (fdinfo "lock:" lines)


_LOCK_KINDS = {b"FLOCK": "flock", b"POSIX": "posix", b"OFDLCK": "ofd"}


def _parse_lock(line: bytes) -> FileLock | None:
    """One fdinfo "lock:" line, e.g. `lock:\t1: POSIX  ADVISORY  WRITE 123
    fe:00:456 5 14`; None for a waiter (`1: -> ...`), which holds nothing."""
    held = _parse_locks_line(line.removeprefix(b"lock:"))
    return held[0] if held else None


class HeldLock(NamedTuple):
    lock: FileLock
    pid: int  # who took it (a flock's, a POSIX lock's owner); -1 for an OFD lock
    dev: str  # "fe:00", as in /proc/PID/maps
    inode: int


def read_locks() -> list[HeldLock]:
    """Every lock held on the system (/proc/locks), waiters left out."""
    locks = []
    with open("/proc/locks", "rb") as f:
        lines = f.read().splitlines()
    for line in lines:
        if held := _parse_locks_line(line):
            locks.append(HeldLock(*held))
    return locks


def _parse_locks_line(line: bytes) -> tuple[FileLock, int, str, int] | None:
    """`1: FLOCK  ADVISORY  WRITE 123 fe:00:456 0 EOF`: the lock, its pid, the
    file's device and inode; None for a waiter (`1: -> ...`)."""
    words = line.split()
    if len(words) < 7 or words[1] == b"->":
        return None
    kind = _LOCK_KINDS.get(words[1], words[1].decode(errors="replace"))
    end = None if words[-1] == b"EOF" else int(words[-1])
    major, minor, inode = words[-3].decode().split(":")
    lock = FileLock(kind, words[3] == b"WRITE", int(words[-2]), end)
    return lock, int(words[4]), f"{major}:{minor}", int(inode)


def read_fdinfo(pid: int, fd: int) -> dict[str, str]:
    """/proc/PID/fdinfo/N as {key: value}; extra keys (eventfd, uffd...) are kept."""
    out: dict[str, str] = {}
    for line in _read_text(pid, f"{task_dir(pid)}/fdinfo/{fd}").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def read_fdinfo_bytes(pid: int, fd: int) -> bytes:
    """/proc/PID/fdinfo/N as it is (an epoll fd lists one line per watched fd)."""
    return _read_bytes(pid, f"{task_dir(pid)}/fdinfo/{fd}")


def read_fds(pid: int) -> list[FdInfo]:
    """Open fds of pid, sorted; an fd closed while we read it is left out."""
    out = []
    where = task_dir(pid)
    for name in _listdir(pid, f"{where}/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"{where}/fd/{fd}")
            with open(f"{where}/fdinfo/{fd}", "rb") as f:
                info = f.read()
        except _GONE:
            continue
        pos = flags = mnt_id = 0
        locks = []
        for line in info.split(b"\n"):
            if line.startswith(b"pos:"):
                pos = int(line[4:])
            elif line.startswith(b"flags:"):
                flags = int(line[6:], 8)
            elif line.startswith(b"mnt_id:"):
                mnt_id = int(line[7:])
            elif line.startswith(b"lock:") and (lock := _parse_lock(line)):
                locks.append(lock)
        out.append(FdInfo(fd, target, pos, flags, mnt_id, tuple(locks)))
    if not os.path.exists(f"/proc/{pid}"):
        raise _gone(pid)
    return sorted(out)


# /proc/PID/limits row titles -> resource names (RLIMIT_<NAME>.lower() without prefix)
RLIMIT_NAMES = {
    "Max cpu time": "cpu",
    "Max file size": "fsize",
    "Max data size": "data",
    "Max stack size": "stack",
    "Max core file size": "core",
    "Max resident set": "rss",
    "Max processes": "nproc",
    "Max open files": "nofile",
    "Max locked memory": "memlock",
    "Max address space": "as",
    "Max file locks": "locks",
    "Max pending signals": "sigpending",
    "Max msgqueue size": "msgqueue",
    "Max nice priority": "nice",
    "Max realtime priority": "rtprio",
    "Max realtime timeout": "rttime",
}


# resource numbers (asm-generic/resource.h; Python's resource lacks RLIMIT_LOCKS)
RLIMIT_NUMBERS = {name: i for i, name in enumerate(RLIMIT_NAMES.values())}


def read_rlimits(pid: int) -> dict[str, list[int]]:
    """{"nofile": [soft, hard], ...} from /proc/PID/limits; -1 = unlimited.

    Keys are the RLIMIT_* names lowercased without the prefix ("cpu", "nofile"...),
    RLIMIT_NUMBERS maps them to resource numbers for prlimit().
    """
    out: dict[str, list[int]] = {}
    for line in _read_text(pid, f"/proc/{pid}/limits").splitlines()[1:]:
        # "Max open files            1024                 524288               files"
        for title, key in RLIMIT_NAMES.items():
            if line.startswith(title + " "):
                soft, hard = line[len(title) :].split()[:2]
                out[key] = [-1 if v == "unlimited" else int(v) for v in (soft, hard)]
                break
    return out


def read_personality(pid: int) -> int:
    """/proc/PID/personality (hex)."""
    return int(_read_text(pid, f"/proc/{pid}/personality"), 16)


def read_comm(pid: int) -> str:
    return _read_text(pid, f"/proc/{pid}/comm").rstrip("\n")


def read_task_comm(pid: int, tid: int) -> str:
    """The thread's name (task/TID/comm; pthread_setname_np sets it per thread)."""
    return _read_text(pid, f"/proc/{pid}/task/{tid}/comm").rstrip("\n")


def read_umask(pid: int, tid: int | None = None) -> int:
    """The file mode creation mask (status Umask, octal; a zombie main thread has
    none: ask a live thread)."""
    return read_task_status(pid, tid).umask


SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 1, 2


def read_seccomp_mode(pid: int, tid: int | None = None) -> int:
    """Seccomp mode from status: 0 none, 1 strict, 2 filter."""
    return read_task_status(pid, tid).seccomp_mode


# --- file identities ---------------------------------------------------------------


def _stat_or_none(pid: int, path: str) -> os.stat_result | None:
    """stat(2) through a /proc magic link: the file itself, deleted or not."""
    try:
        return os.stat(path)
    except _GONE:
        if not os.path.exists(f"/proc/{pid}"):
            raise _gone(pid) from None
        return None
    except OSError:
        return None  # EACCES, or a file on a mount we cannot reach


def stat_fd(pid: int, fd: int) -> os.stat_result | None:
    """stat of what fd N of pid refers to (also pipes, sockets, deleted files)."""
    return _stat_or_none(pid, f"{task_dir(pid)}/fd/{fd}")


MQUEUE_MAGIC = 0x19800202  # statfs f_type of the POSIX message queue file system


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def fd_fs_type(pid: int, fd: int) -> int | None:
    """statfs f_type of the file system fd N of pid is on (None if gone)."""
    buf = _Statfs()
    path = f"{task_dir(pid)}/fd/{fd}".encode()
    if libc.statfs(path, ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def stat_exe(pid: int) -> os.stat_result | None:
    return _stat_or_none(pid, f"{task_dir(pid)}/exe")


def stat_mapped_file(pid: int, start: int, end: int) -> os.stat_result | None:
    """stat of the file mapped at [start, end) (map_files/; needs CAP_SYS_ADMIN)."""
    return _stat_or_none(pid, f"{task_dir(pid)}/map_files/{start:x}-{end:x}")


def mapped_file_data(
    pid: int, start: int, end: int, lo: int, hi: int
) -> list[tuple[int, int]] | None:
    """The byte ranges of [lo, hi) (file offsets, page aligned) that hold data in
    the object mapped at start-end (SEEK_DATA/SEEK_HOLE through
    /proc/PID/map_files), or None when that cannot be read (it needs
    CAP_SYS_ADMIN). Reading a hole of shmem or a memfd through /proc/PID/mem
    would allocate it in the target."""
    try:
        fd = os.open(f"{task_dir(pid)}/map_files/{start:x}-{end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    out: list[tuple[int, int]] = []
    try:
        pos = lo
        while pos < hi:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= hi:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data - data % page, min(hi, -(-hole // page) * page)))
            pos = hole
    finally:
        os.close(fd)
    return out


def open_fd_file(pid: int, fd: int) -> int:
    """Our own read-only fd on the file behind fd N of pid (deleted ones too)."""
    return _open_magic(pid, f"{task_dir(pid)}/fd/{fd}")


def open_mapped_file(pid: int, start: int, end: int) -> int:
    """Our own read-only fd on the file mapped at [start, end) (deleted ones too)."""
    return _open_magic(pid, f"{task_dir(pid)}/map_files/{start:x}-{end:x}")


def _open_magic(pid: int, path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except _GONE:
        raise _gone(pid) from None
