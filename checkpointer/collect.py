"""Read a frozen process tree's state into image records.

Everything here runs while the tree is stopped, so the records of one dump
describe one instant: registers, signal masks, memory map, files.
"""

from __future__ import annotations

from checkpointer.errors import TargetError
from checkpointer.freezer import FrozenTree
from checkpointer.kernel import proc, ptrace
from checkpointer.vmas import Vma, vma_record


def read_vmas(pid: int, known: list[Vma] | None = None) -> list[Vma]:
    """The process's VMAs with their smaps flags.

    `known`: the VMAs as read a moment ago (before a freeze). When /proc/PID/maps
    lists exactly those mappings again, their flags are reused: walking smaps costs
    about 50 ms per resident GiB, which would otherwise be downtime. The flags that
    matter (hugetlb, io/pfnmap: fixed at mmap; "uw": set only by this tool) cannot
    change without the mapping changing.
    """
    maps = proc.read_maps(pid)
    if known is not None and len(known) == len(maps):
        by_key = {_key(v): v for v in known}
        same = [by_key.get(_key(m)) for m in maps]
        if all(same):
            return same  # type: ignore[return-value]
    flags = proc.read_smaps_vmflags(pid)
    return [
        Vma(m.start, m.end, m.prot, m.offset, m.dev, m.inode, m.path, tuple(flags.get(m.start, ())))
        for m in maps
    ]


def _key(m) -> tuple:
    return (m.start, m.end, m.prot, m.offset, m.dev, m.inode, m.path)


def pstree_records(tree: FrozenTree) -> list[dict]:
    records = []
    for pid, tids in tree.threads.items():
        stat = proc.read_stat(pid)
        records.append(
            {
                "pid": pid,
                "ppid": stat.ppid,
                "pgid": stat.pgrp,
                "sid": stat.session,
                "threads": list(tids),
            }
        )
    return records


def core_records(pid: int, tids: list[int], was_stopped: bool) -> tuple[dict, list[dict]]:
    """The process record and one record per (frozen) thread."""
    stat = proc.read_stat(pid)
    masks = proc.read_signal_masks(pid, pid)
    process = {
        "pid": pid,
        "comm": stat.comm,
        # The state the task had before we froze it: "T" if it was group-stopped.
        "state": "T" if was_stopped else "R",
        "personality": proc.read_personality(pid),
        "creds": proc.read_creds(pid),
        "rlimits": proc.read_rlimits(pid),
        "sigignore": masks["sigignore"],
        "sigcatch": masks["sigcatch"],
    }
    threads = []
    for tid in tids:
        masks = proc.read_signal_masks(pid, tid)
        threads.append(
            {
                "tid": tid,
                "regs": ptrace.get_regs(tid),
                "xstate": ptrace.get_xstate(tid),
                "blocked": ptrace.get_sigmask(tid),
                "pending": masks["pending"],
                "shared_pending": masks["shared_pending"],
                "state": proc.read_state(pid, tid),
            }
        )
    return process, threads


def mm_record(pid: int) -> dict:
    stat = proc.read_stat(pid, brk=True)
    return {
        "start_code": stat.start_code,
        "end_code": stat.end_code,
        "start_data": stat.start_data,
        "end_data": stat.end_data,
        "start_brk": stat.start_brk,
        "brk": stat.brk,  # the end of [heap]: the kernel does not export mm->brk
        "start_stack": stat.start_stack,
        "arg_start": stat.arg_start,
        "arg_end": stat.arg_end,
        "env_start": stat.env_start,
        "env_end": stat.env_end,
        "exit_code": stat.exit_code,
        "auxv": proc.read_auxv(pid),
        "exe": proc.read_link(pid, "exe"),
        "cwd": proc.read_link(pid, "cwd"),
        "root": proc.read_link(pid, "root"),
    }


def fd_records(pid: int, hide: set[int] | frozenset[int] = frozenset()) -> list[dict]:
    """The process's open files, without `hide` (fds the tool put there)."""
    return [
        {
            "fd": fd.fd,
            "target": fd.target,
            "pos": fd.pos,
            "flags": fd.flags,
            "type": fd_type(fd.target),
            "mnt_id": fd.mnt_id,
        }
        for fd in proc.read_fds(pid)
        if fd.fd not in hide
    ]


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


def vma_records(vmas: list[Vma], hide_flags: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """The mm image's VMA records, without the VmFlags in `hide_flags` (set by the tool)."""
    records = [vma_record(v) for v in vmas]
    if hide_flags:
        for r in records:
            r["vmflags"] = [f for f in r["vmflags"] if f not in hide_flags]
    return records


def start_time(pid: int) -> int:
    """Process start time in clock ticks: tells one incarnation of a PID from another."""
    try:
        return proc.read_stat(pid).starttime
    except TargetError:
        raise TargetError(f"process {pid} does not exist") from None
