"""Read a frozen process tree's state into image records.

Everything here runs while the tree is stopped, so the records of one dump
describe one instant: registers, signal masks, memory map, files.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from checkpointer import fdstate
from checkpointer.errors import TargetError, UnsupportedObject
from checkpointer.fdstate import files as fdfiles
from checkpointer.freezer import FrozenTree
from checkpointer.kernel import abi, cgroup, kcmp, proc, ptrace, pty, sched, sysvshm, taskstate
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import O_CLOEXEC
from checkpointer.vmas import Vma, vma_record

_DELETED = " (deleted)"
log = logging.getLogger("checkpointer")


def read_vmas(pid: int, known: list[Vma] | None = None) -> list[Vma]:
    """The process's VMAs with their smaps flags (read_vmas_reusing)."""
    return read_vmas_reusing(pid, known)[0]


def read_vmas_reusing(pid: int, known: list[Vma] | None = None) -> tuple[list[Vma], bool]:
    """The process's VMAs with their smaps flags, and whether those flags are the
    ones of `known`.

    `known`: the VMAs as read a moment ago (before a freeze). When /proc/PID/maps
    lists exactly those mappings again, their flags are reused: walking smaps costs
    about 50 ms per resident GiB, which would otherwise be downtime. But madvise or
    mlock over a whole VMA changes its flags (DONTFORK, WIPEONFORK, DONTDUMP,
    HUGEPAGE, locked...) and not its maps line, so reused flags must be checked
    against the instant of the dump before they are trusted (vmflags_changed).
    """
    maps = proc.read_maps(pid)
    if known is not None and len(known) == len(maps):
        by_key = {_key(v): v for v in known}
        same = [by_key.get(_key(m)) for m in maps]
        if all(same):
            return same, True  # type: ignore[return-value]
    flags = proc.read_smaps_vmflags(pid)
    return [Vma(*m[:7], tuple(flags.get(m.start, ())), m.deleted) for m in maps], False


def read_vmas_listed(pid: int, known: list[Vma]) -> list[Vma]:
    """The process's VMAs from its maps file alone (cheap enough to read while it
    is stopped), with the smaps flags of `known` where a mapping is listed alike
    there, and none where it is not."""
    by_key = {_key(v): v for v in known}
    return [by_key.get(_key(m)) or Vma(*m[:7], (), m.deleted) for m in proc.read_maps(pid)]


# VmFlags that are tracking state, not the target's: uffd registration (this tool's
# uffd-wp tracker registers in the window), soft-dirty (cleared by its reset).
_TRACKING_FLAGS = frozenset({"um", "uw", "ui", "sd"})
# What a fork changes: the child's VMAs are not locked (VM_LOCKED_MASK).
FORK_CLEARS = frozenset({"lo", "lf"})


def vmflags_changed(
    vmas: list[Vma], smaps: list[tuple[int, int, list[str]]], forked: bool = False
) -> list[tuple[Vma, list[str] | None]]:
    """The VMAs whose flags differ from those in `smaps` (proc.read_smaps_vmas, read
    at the instant of the dump: from the frozen process, or from its copy-on-write
    child when `forked`, which lacks the DONTFORK VMAs and the lock flags), each with
    its flags there (None: not mapped there). Each VMA is compared with the one that
    holds its start now: registering uffd-wp in the window may have merged it with a
    neighbour of the same flags."""
    ignore = _TRACKING_FLAGS | FORK_CLEARS if forked else _TRACKING_FLAGS
    starts = [start for start, _end, _flags in smaps]
    changed: list[tuple[Vma, list[str] | None]] = []
    for v in vmas:
        i = bisect.bisect_right(starts, v.start) - 1
        now = smaps[i][2] if i >= 0 and v.start < smaps[i][1] else None
        if now is None:
            # Only a DONTFORK VMA is absent from the child.
            if not (forked and "dc" in v.vmflags):
                changed.append((v, None))
        elif set(now) - ignore != set(v.vmflags) - ignore:
            changed.append((v, now))
    return changed


class SmapsReader:
    """The smaps flags of some processes, read on a thread while the dump goes on.

    The read is the kernel's walk of every page table (~10 ms per resident GiB),
    with the GIL released. It holds the mmap lock for reading: start it only where
    nothing in the window takes that lock for writing any more (uffd registration,
    an injected mmap, the snapshot's clone), or they would wait for the walk."""

    def __init__(self, pids: list[int]) -> None:
        self._smaps: dict[int, list[tuple[int, int, list[str]]]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(pids,), daemon=True)
        self._thread.start()

    def _read(self, pids: list[int]) -> None:
        try:
            for pid in pids:
                self._smaps[pid] = proc.read_smaps_vmas(pid)
        except BaseException as err:  # given to the dump's thread by smaps()
            self._error = err

    def smaps(self, pid: int) -> list[tuple[int, int, list[str]]]:
        """proc.read_smaps_vmas(pid), as read on the thread."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._smaps[pid]


def _key(m) -> tuple:
    return (m.start, m.end, m.prot, m.offset, m.dev, m.inode, m.path, m.deleted)


def pstree_records(tree: FrozenTree) -> list[dict]:
    """One record per live process; its unreaped exited children (zombies) are
    listed in its record, with their exit status."""
    records = {}
    for pid, tids in tree.threads.items():
        stat = proc.read_stat(pid)
        records[pid] = {
            "pid": pid,
            "ppid": stat.ppid,
            "pgid": stat.pgrp,
            "sid": stat.session,
            "threads": list(tids),
            "zombies": [],
        }
    for pid in tree.zombies:
        try:
            stat = proc.read_stat(pid)
        except TargetError:
            continue  # reaped before the tree was frozen
        if stat.state == "Z" and stat.ppid in records:
            records[stat.ppid]["zombies"].append(
                {"pid": pid, "pgid": stat.pgrp, "sid": stat.session, "exit_status": stat.exit_code}
            )
    zombies = {z["pid"] for r in records.values() for z in r["zombies"]}
    for r in records.values():
        if led := {r["sid"], r["pgid"]} & zombies:
            raise UnsupportedObject(
                f"process {r['pid']} is in a session or group led by zombie {led.pop()}: "
                "not supported"
            )
    return list(records.values())


class FrozenStatus:
    """Each frozen thread's status file, read once per window on first use. What the
    dump takes from it (state, signal masks, credentials, umask, seccomp mode) holds
    still while the thread is in a ptrace stop; under TCG every /proc read costs about
    a millisecond of the window, and the checks and records of a process asked
    5 + 6 per thread of them."""

    def __init__(self) -> None:
        self._read: dict[tuple[int, int], proc.TaskStatus] = {}

    def __call__(self, pid: int, tid: int) -> proc.TaskStatus:
        status = self._read.get((pid, tid))
        if status is None:
            status = self._read[pid, tid] = proc.read_task_status(pid, tid)
        return status


@dataclass
class InjectedState:
    """What syscalls injected into a frozen process read (final dumps only)."""

    process: dict  # sigactions, itimers, prctl
    threads: dict[int, dict] = field(default_factory=dict)  # tid -> tid_address, sigaltstack
    brk: int = 0  # exact mm->brk


# The fields of a thread that could not be asked (not a live thread): nothing set.
_NO_THREAD_STATE = {"tid_address": 0, "sigaltstack": {"sp": 0, "flags": abi.SS_DISABLE, "size": 0}}


def read_injected_state(
    pid: int, tids: list[int], status: FrozenStatus | None = None
) -> InjectedState:
    """Process-wide state from one live thread (the main one unless it is a zombie:
    a main thread that called pthread_exit cannot run a syscall), then each live
    thread's own. One scratch area serves every thread: they share the memory."""
    started = time.monotonic()
    status = status or FrozenStatus()
    live = [tid for tid in tids if status(pid, tid).state not in ("Z", "X")]
    if not live:
        raise TargetError(f"process {pid} has no live thread to read its state from")
    first = pid if pid in live else live[0]
    suspended = _suspend_seccomp(pid, live, status)
    try:
        # timer_create's timers: what /proc/PID/timers lists, with the time left,
        # the interval and the overrun count read by timer_gettime in the task.
        timers = proc.read_posix_timers(pid)
        queries = [
            taskstate.sigactions_query(),
            taskstate.itimers_query(),
            taskstate.prctl_query(),
            taskstate.brk_query(),
            taskstate.thread_state_query(),
        ]
        if timers:
            queries.append(taskstate.posix_timer_times_query([t["id"] for t in timers]))
        with SyscallSession(first) as session:
            sigactions, itimers, prctl, brk, thread, *timer_times = taskstate.run_queries(
                session, queries
            )
            times = timer_times[0] if timer_times else []
            state = InjectedState(
                process={
                    "sigactions": sigactions,
                    "itimers": itimers,
                    "posix_timers": [{**t, **tt} for t, tt in zip(timers, times, strict=True)],
                    "prctl": prctl,
                },
                brk=brk,
            )
            state.threads[first] = thread
            scratch, size, executable = session.scratch_area
            for tid in live:
                if tid == first:
                    continue
                with SyscallSession(tid, insn=session.insn) as thread_session:
                    thread_session.adopt_scratch(
                        scratch, size, unmap_on_close=False, executable=executable
                    )
                    state.threads[tid] = taskstate.run_queries(
                        thread_session, [taskstate.thread_state_query()]
                    )[0]
    finally:
        for tid in suspended:
            try:
                ptrace.set_options(tid, 0)
            except TargetError:
                pass  # gone: the error that ended the session says why
    log.debug(
        "pid %d: injected reads of %d threads in %d us",
        pid, len(live), (time.monotonic() - started) * 1e6,
    )  # fmt: skip
    return state


def _suspend_seccomp(pid: int, tids: list[int], status: FrozenStatus) -> list[int]:
    """Let injected syscalls past the threads' seccomp filters (a strict or filtering
    thread would otherwise be killed or refused); returns the threads changed."""
    changed = []
    for tid in tids:
        if status(pid, tid).seccomp_mode:
            ptrace.set_options(tid, ptrace.PTRACE_O_SUSPEND_SECCOMP)
            changed.append(tid)
    return changed


def core_records(
    pid: int,
    tids: list[int],
    was_stopped: bool,
    injected: InjectedState | None = None,
    status: FrozenStatus | None = None,
) -> tuple[dict, list[dict]]:
    """The process record and one record per (frozen) thread. `injected`: the state
    read_injected_state read (required for a version 2 image)."""
    status = status or FrozenStatus()
    stat = proc.read_stat(pid)
    main = status(pid, pid)
    masks = main.signal_masks
    # A live thread for what a zombie main thread no longer has (its fs, its queue).
    live = next(iter(injected.threads), pid) if injected is not None else pid
    process = {
        "pid": pid,
        "comm": stat.comm,
        # The state the task had before we froze it: "T" if it was group-stopped.
        "state": "T" if was_stopped else "R",
        "personality": proc.read_personality(pid),
        "creds": main.creds,
        "rlimits": proc.read_rlimits(pid),
        "sigignore": masks["sigignore"],
        "sigcatch": masks["sigcatch"],
        "umask": status(pid, live).umask,
        "seccomp": status(pid, live).seccomp_mode,
        "oom_score_adj": sched.read_oom_score_adj(pid),
        "cgroup2": cgroup.cgroup2_of(pid),
        "ctty": {
            "dev": stat.tty_nr,
            "index": pty.pts_index(stat.tty_nr),
            "foreground": stat.tpgid,
        },
    }
    if injected is not None:
        process.update(injected.process)
        process["shared_siginfo"] = ptrace.peek_siginfo(live, shared=True)
    threads = []
    for tid in tids:
        thread = status(pid, tid)
        masks = thread.signal_masks
        record = {
            "tid": tid,
            "regs": ptrace.get_regs(tid),
            "xstate": ptrace.get_xstate(tid),
            "blocked": ptrace.get_sigmask(tid),
            "pending": masks["pending"],
            "shared_pending": masks["shared_pending"],
            "state": thread.state,
            "comm": proc.read_task_comm(pid, tid),
            "robust_list": taskstate.read_robust_list(tid),
            "rseq": ptrace.get_rseq_config(tid),
            "siginfo": ptrace.peek_siginfo(tid, shared=False),
            "sched": sched.read_thread_sched(tid),
        }
        if thread.seccomp_mode == proc.SECCOMP_MODE_FILTER:
            record["seccomp_filters"] = [
                {"prog": prog, "flags": flags} for prog, flags in ptrace.seccomp_filters(tid)
            ]
        if injected is not None:
            record.update(injected.threads.get(tid, _NO_THREAD_STATE))
        threads.append(record)
    return process, threads


def mm_record(pid: int, injected: InjectedState | None = None) -> dict:
    """The mm record; brk is exact with `injected` (a final dump), else the end of
    [heap] (the kernel does not export mm->brk in /proc)."""
    # Through a live thread: a zombie main thread has no mm, fs (cwd, root) or exe.
    tid = proc.live_tid(pid)
    task = f"task/{tid}/"
    stat = proc.read_stat(pid, tid, brk=injected is None)
    return {
        "start_code": stat.start_code,
        "end_code": stat.end_code,
        "start_data": stat.start_data,
        "end_data": stat.end_data,
        "start_brk": stat.start_brk,
        "brk": stat.brk if injected is None else injected.brk,
        "start_stack": stat.start_stack,
        "arg_start": stat.arg_start,
        "arg_end": stat.arg_end,
        "env_start": stat.env_start,
        "env_end": stat.env_end,
        "exit_code": stat.exit_code,
        "auxv": proc.read_auxv(pid),
        "exe": proc.read_link(pid, task + "exe"),
        "cwd": proc.read_link(pid, task + "cwd"),
        "root": proc.read_link(pid, task + "root"),
        "exe_stat": file_identity(proc.stat_exe(pid)),
    }


def fd_records(pid: int, hide: set[int] | frozenset[int] = frozenset()) -> list[dict]:
    """The process's open files, without `hide` (fds the tool put there)."""
    records = []
    for fd in proc.read_fds(pid):
        if fd.fd in hide:
            continue
        st = proc.stat_fd(pid, fd.fd)
        if fd.flags & os.O_PATH:
            pass  # names a file without opening it: no position, no driver state
        elif st is not None and stat.S_ISCHR(st.st_mode):
            _check_device(pid, fd, st.st_rdev)
        elif st is not None and fd.target.startswith("/"):
            _check_reachable(pid, fd, st)
            if fd.target.endswith(_DELETED):  # under another name still?
                what = f"fd {fd.fd} of process {pid} ({fd.target})"
                fd = fd._replace(
                    target=fdfiles.linked_name(fd.target[: -len(_DELETED)], st, what) or fd.target
                )
        records.append({
            "fd": fd.fd,
            "target": fd.target,
            "pos": fd.pos,
            "flags": fd.flags,
            "type": fd_type(fd.target),
            "mnt_id": fd.mnt_id,
            "cloexec": bool(fd.flags & O_CLOEXEC),
            "deleted": fd.target.startswith("/") and fd.target.endswith(_DELETED),
            "stat": file_identity(st),
            **({"locks": [lock._asdict() for lock in fd.locks]} if fd.locks else {}),
        })  # fmt: skip
    for rec in records:
        if (
            rec["type"] == "file"
            and rec["stat"]
            and stat.S_ISFIFO(rec["stat"]["mode"])
            and not rec["flags"] & os.O_PATH  # (then a name, never a pipe's end)
        ):
            rec["type"] = "fifo"
        rec.update(fdstate.describe(pid, rec))
    return records


# Character devices whose fds hold nothing but a position and flags, so that
# opening the path again is the same: the memory devices (null, zero, full,
# random, urandom, kmsg), terminals and the console, ptmx and pseudo-terminals.
STATELESS_CHAR_MAJORS = frozenset({1, 4, 5, *range(136, 144)})


def _check_device(pid: int, fd: proc.FdInfo, rdev: int) -> None:
    """Any other device keeps its state in its driver (a VM in /dev/kvm, a FUSE
    connection, a TUN interface, a GPU context): a reopened path is a fresh one,
    so such an fd is refused by name, as CRIU refuses unknown devices."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major not in STATELESS_CHAR_MAJORS:
        raise UnsupportedObject(
            f"fd {fd.fd} of process {pid} ({fd.target}): a character device "
            f"({major}:{minor}) whose state lives in its driver cannot be dumped"
        )


def _check_reachable(pid: int, fd: proc.FdInfo, st: os.stat_result) -> None:
    """Restore opens a file again by its path: refused here, while the process
    still runs, is an fd whose path does not lead back to its file (a POSIX
    message queue reads "/NAME", a path of its own file system; a file on a mount
    hidden since, or in another mount namespace). A deleted file's contents are
    kept instead (a ghost), except a message queue's, which is no file."""
    if proc.fd_fs_type(pid, fd.fd) == proc.MQUEUE_MAGIC:
        raise UnsupportedObject(
            f"fd {fd.fd} of process {pid} ({fd.target}): a POSIX message queue cannot "
            "be dumped (its path does not lead back to it from here)"
        )
    if fd.target.endswith(_DELETED):
        return
    if not _leads_back(fd.target, file_identity(st)):
        raise UnsupportedObject(
            f"fd {fd.fd} of process {pid} ({fd.target}): its path does not lead back "
            "to its file from here (another mount, or the file was moved over), so "
            "restore could not open it again"
        )


def _leads_back(path: str, identity: dict) -> bool:
    """Does `path` lead, from here, to the file `identity` (file_identity) names?
    (lstat for a symbolic link: an O_PATH fd of one is the link itself.)"""
    try:
        there = os.lstat(path) if stat.S_ISLNK(identity["mode"]) else os.stat(path)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (identity["dev"], identity["ino"])


def check_namespaces(pids: list[int]) -> None:
    """Namespaces are not dumped: a process in another one than the tool's (a
    container, a service with PrivateTmp, `unshare`) would come back in the
    restorer's, seeing other files, network or PIDs. Refused, naming it."""
    ours = proc.read_namespaces(os.getpid())
    for pid in pids:
        for kind, ns in sorted(proc.read_namespaces(pid).items()):
            if kind in ours and ns != ours[kind]:
                what = kind.replace("_for_children", " (for its children)")
                raise UnsupportedObject(
                    f"process {pid} is in another {what} namespace ({ns}) than "
                    f"checkpointer ({ours[kind]}): namespaces are not dumped; run "
                    "checkpointer inside it"
                )


# What two processes (not threads) can share after clone() without CLONE_THREAD,
# and what restore would split: each restored process gets its own.
SHARED_KINDS = (
    (kcmp.KCMP_VM, "their memory (CLONE_VM: a vfork child before its exec?)"),
    (kcmp.KCMP_FILES, "their file descriptor table (CLONE_FILES)"),
    (kcmp.KCMP_FS, "their working directory, root and umask (CLONE_FS)"),
)


def check_sharing(pids: list[int]) -> None:
    """Restore gives every process its own memory, fd table and cwd: two that
    shared one would come back apart, each missing the other's changes.
    Refused, naming both."""
    for kind, what in SHARED_KINDS:
        for a, b in kcmp.shared_between(sorted(pids), kind):
            raise UnsupportedObject(
                f"processes {min(a, b)} and {max(a, b)} share {what}: restore cannot rebuild that"
            )


def check_seccomp(
    threads: dict[int, list[int]], killing: bool, status: FrozenStatus | None = None
) -> None:
    """Seccomp filters are dumped (each thread's, core_records) and attached again
    by restore; strict mode cannot be (it allows nothing but read, write and exit,
    and restore cannot issue its calls under it). A dump that kills such a process
    is refused, or it would be lost; one that leaves it running still serves
    inspection, with a warning."""
    status = status or FrozenStatus()
    for pid, tids in threads.items():
        for tid in tids:
            if _seccomp_mode(status, pid, tid) == proc.SECCOMP_MODE_STRICT:
                if killing:
                    raise UnsupportedObject(
                        f"process {pid} runs in seccomp strict mode (thread {tid}), which "
                        "restore cannot rebuild: a dump that kills it is refused "
                        "(--leave-running dumps it for inspection)"
                    )
                log.warning(
                    "process %d runs in seccomp strict mode: these images cannot be restored",
                    pid,
                )
                return


def _seccomp_mode(status: FrozenStatus, pid: int, tid: int) -> int:
    try:
        return status(pid, tid).seccomp_mode
    except TargetError:
        return 0  # a thread that exited since the freeze


def check_terminals(
    pstree: list[dict], processes: dict[int, dict], fds: dict[int, list[dict]], shell_job: bool
) -> None:
    """A tree attached to a terminal outside it (a shell job) is dumped only with
    --shell-job, as CRIU does ("dangling tty"): restore then gives it the restoring
    shell's terminal and session. A session whose leader lives outside the tree,
    without a terminal, needs no flag: the restored tree joins the restorer's
    session, as a process started from it would. Pseudo-terminals whose master is
    in the tree are the tree's own (restored as a new pair)."""
    if shell_job:
        return
    masters = {r["pty_master"]["index"] for rs in fds.values() for r in rs if "pty_master" in r}
    for pid, process in processes.items():
        ctty = process["ctty"]
        if ctty["dev"] and ctty["index"] not in masters:
            raise UnsupportedObject(
                f"process {pid} has a controlling terminal outside the tree "
                f"(device {ctty['dev']:#x}): dump with --shell-job"
            )
    for pid, records in fds.items():
        for r in records:
            if r["type"] == "tty" and r.get("pty", {}).get("index") not in masters:
                raise UnsupportedObject(
                    f"fd {r['fd']} of process {pid} ({r['target']}) is a terminal outside "
                    "the tree: dump with --shell-job"
                )


def mark_shared_descriptions(fds: dict[int, list[dict]]) -> None:
    """Give every fd record an "ofd" id, equal for fds that share one open file
    description (dup'ed, or inherited through fork: they share offset and flags),
    as kcmp(KCMP_FILE) tells. Only fds on the same file are compared. Ids follow
    the records' order."""
    same_file: dict[tuple, list[tuple[int, int, dict]]] = {}  # file -> [(tid, fd, record)]
    for pid, records in fds.items():
        tid = proc.live_tid(pid)  # a zombie main thread has no files to compare
        for rec in records:
            st = rec.get("stat") or {}
            key = (rec["target"], st.get("dev"), st.get("ino"))
            same_file.setdefault(key, []).append((tid, rec["fd"], rec))
    groups = []
    for entries in same_file.values():
        if len(entries) == 1:
            groups.append([entries[0][2]])
            continue
        indexes = kcmp.open_file_groups([(tid, fd) for tid, fd, _ in entries])
        groups += [[entries[i][2] for i in group] for group in indexes]
    position = {id(rec): n for n, rec in enumerate(r for recs in fds.values() for r in recs)}
    groups.sort(key=lambda group: min(position[id(rec)] for rec in group))
    for ofd, group in enumerate(groups):
        for rec in group:
            rec["ofd"] = ofd


def mark_mapping_locks(fds: dict[int, list[dict]], vmas: dict[int, list[dict]]) -> None:
    """A flock lock lives on while anything holds its open file description: a
    mapping of the file too, once every fd of it is closed (the JVM flocks its
    hsperfdata file, maps it MAP_SHARED and closes the fd). No fdinfo lists it;
    /proc/locks names the file and the process that took it. It is recorded on
    that process's first mapping of the file (vma "locks"), unless an fd of the
    tree on the file lists a flock (the fd's record has it). An OFD lock held so
    is not found: /proc/locks names no process for it."""
    by_fds = {
        (st["dev"], st["ino"])
        for records in fds.values()
        for rec in records
        if (st := rec.get("stat")) and any(lk["kind"] == "flock" for lk in rec.get("locks", ()))
    }
    for held in proc.read_locks():
        if held.lock.kind != "flock" or held.pid not in vmas:
            continue
        vma = next((v for v in vmas[held.pid] if _maps_file(v, held.dev, held.inode)), None)
        if vma is None or not vma["stat"] or (vma["stat"]["dev"], vma["stat"]["ino"]) in by_fds:
            continue
        if held.lock._asdict() not in vma.setdefault("locks", []):
            vma["locks"].append(held.lock._asdict())


def _maps_file(vma: dict, dev: str, inode: int) -> bool:
    return vma["inode"] == inode and vma["dev"] == dev and vma["kind"] in ("file", "file-private")


def file_identity(st: os.stat_result | None) -> dict | None:
    """What tells one file from another at restore: device, inode, type and mode,
    size, modification time."""
    if st is None:
        return None
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "mode": st.st_mode,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def fd_type(target: str) -> str:
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("anon_inode:"):
        return "anon"
    if target.startswith(("/dev/pts/", "/dev/tty")) or target == "/dev/console":
        return "tty"
    if target.startswith("/"):
        return "file"
    return "other"


def vma_records(
    pid: int,
    vmas: list[Vma],
    final: bool = False,
    hide_flags: set[str] | frozenset[str] = frozenset(),
    seen: dict | None = None,
) -> list[dict]:
    """vma records with the identity of each mapped file (map_files/ reaches
    deleted files too), without the VmFlags in `hide_flags` (set by the tool); in a
    final dump, a mapped deleted file is a ghost whose contents the images hold
    (fdstate/files.py). `seen`: what this pass already found out about a file
    (device and inode as maps shows them): a tree of forked processes maps the
    same libraries hundreds of times, and each stat costs while the tree is frozen."""
    seen = {} if seen is None else seen
    records = []
    for v in vmas:
        rec = {**vma_record(v), "stat": _mapped_identity(pid, v, seen) if v.inode else None}
        if final and v.kind == "shm":
            rec["sysv"] = sysvshm.read_segment(v.inode)
            if rec["sysv"] is None:
                raise UnsupportedObject(
                    f"process {pid} maps SysV shared memory {v.inode} at {v.start:#x}, "
                    "which /proc/sysvipc/shm does not list (another IPC namespace?)"
                )
        if final and v.kind in ("file", "file-private"):
            what = f"process {pid} maps {v.path} at {v.start:#x}"
            linked = _linked_name_once(pid, v, what, seen) if v.deleted else None
            if linked:  # the mapping is of a file that has another name
                rec.update(path=linked, deleted=False)
            elif v.deleted:
                rec["ghost"] = fdfiles.ghost(rec["stat"], what)
            elif rec["stat"] is not None and not _leads_back_once(v.path, rec["stat"], seen):
                raise UnsupportedObject(
                    f"{what}: its path does not lead back to the mapped file from here "
                    "(another mount, or the file was moved over), so restore could not "
                    "map it again"
                )
        if hide_flags:
            rec["vmflags"] = [f for f in rec["vmflags"] if f not in hide_flags]
        records.append(rec)
    return records


def _mapped_identity(pid: int, v: Vma, seen: dict) -> dict | None:
    key = ("identity", v.dev, v.inode)
    if key not in seen:
        seen[key] = file_identity(proc.stat_mapped_file(pid, v.start, v.end))
    return seen[key]


def _linked_name_once(pid: int, v: Vma, what: str, seen: dict) -> str | None:
    key = ("linked", v.dev, v.inode)
    if key not in seen:
        st = proc.stat_mapped_file(pid, v.start, v.end)
        seen[key] = fdfiles.linked_name(v.path, st, what)
    return seen[key]


def _leads_back_once(path: str, identity: dict, seen: dict) -> bool:
    key = ("leads back", path, identity["dev"], identity["ino"])
    if key not in seen:
        seen[key] = _leads_back(path, identity)
    return seen[key]


def content_sources(fds: dict[int, list[dict]], vmas: dict[int, list[dict]]) -> dict[str, tuple]:
    """Where to read the whole contents of each ghost file and memfd, by page owner:
    ("fd", pid, fd) or ("map", pid, start, end)."""
    sources: dict[str, tuple] = {}
    for pid, records in fds.items():
        for rec in records:
            obj = rec.get("ghost") or rec.get("memfd")
            if obj is not None:
                sources.setdefault(obj["owner"], ("fd", pid, rec["fd"], obj["size"]))
    for pid, records in vmas.items():
        for rec in records:
            if "ghost" in rec:
                size = rec["ghost"]["size"]
                sources.setdefault(
                    rec["ghost"]["owner"], ("map", pid, rec["start"], rec["end"], size)
                )
    return sources


def start_time(pid: int) -> int:
    """Process start time in clock ticks: tells one incarnation of a PID from another."""
    try:
        return proc.read_stat(pid).starttime
    except TargetError:
        raise TargetError(f"process {pid} does not exist") from None
