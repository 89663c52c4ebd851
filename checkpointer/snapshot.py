"""A copy-on-write snapshot of a frozen tree, so it can run on while its pages are read.

While the tree is frozen and its state and dirty bits have been read, every
process gets a copy-on-write child (kernel/cowchild.py): the kernel copies page
tables, not pages, in milliseconds. The tree is thawed at once; the page copier
then reads private memory from the children, which still hold it as it was at
the freeze, and the children are killed and reaped afterwards.

What a fork does not copy on write is read from the original inside the frozen
window and held in memory until the copier asks for it:
- MAP_SHARED memory is the same memory in the child (chosen: copy it in the
  window; it is usually small, and a file or memfd cannot be snapshot otherwise);
- MADV_DONTFORK regions are absent from the child, MADV_WIPEONFORK regions are
  zero there;
- [vdso] (small, and dumped whole).
Above PREFETCH_LIMIT bytes of such memory, or when the clone fails (strict
overcommit: ENOMEM; a pids limit: EAGAIN), there is no snapshot: the dump copies
with the tree frozen, as without this module, and says so.

Dirty tracking (soft-dirty, uffd-wp) was read and reset in the original before
the clone and stays with the original: a child never has it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import subprocess
import sys
import time

from checkpointer.copier import Segment
from checkpointer.errors import TargetError
from checkpointer.freezer import FrozenTree, stopped_thread
from checkpointer.kernel import cowchild, proc
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.memory import MemReader
from checkpointer.plan import private_plan, shared_plans
from checkpointer.trackers import VmaPages
from checkpointer.vmas import Policy, Vma

log = logging.getLogger("checkpointer")

# Memory read inside the window and held until copied (shared, DONTFORK, WIPEONFORK).
PREFETCH_LIMIT = 256 << 20
# VmFlags of regions a forked child does not get as they are.
NOT_FORKED = ("dc", "wf")


class Snapshot:
    """Copy-on-write children of a frozen tree, plus what they cannot show."""

    def __init__(self) -> None:
        self.children: dict[int, cowchild.CowChild] = {}  # target pid -> its child
        self.held: dict[int, _HeldMemory] = {}  # target pid -> memory read in the window
        self.take_us = 0
        self._reaper: subprocess.Popen | None = None

    def _start_reaper(self) -> None:
        """The watchdog that reaps the children should this tool die (reaper.py)."""
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "checkpointer.reaper"], stdin=subprocess.PIPE, text=True
        )

    def _tell_reaper(self, line: str) -> None:
        if self._reaper and self._reaper.stdin:
            with contextlib.suppress(OSError):
                self._reaper.stdin.write(line + "\n")
                self._reaper.stdin.flush()

    def _spawn(self, pid: int, tid: int) -> None:
        child = cowchild.spawn(tid, pid)
        self.children[pid] = child
        self._tell_reaper(f"{pid} {child.pid}")

    def readers(self) -> dict[int, SnapshotReader]:
        """A memory reader per target pid, for the page copier."""
        return {
            pid: SnapshotReader(child.pid, self.held.get(pid, _HeldMemory()))
            for pid, child in self.children.items()
        }

    def release(self, frozen: bool = False) -> None:
        """Kill every child and reap it in its parent, leaving no trace. `frozen`: the
        parents are still in our ptrace stop (no need to stop them again)."""
        for child in self.children.values():
            cowchild.kill(child)
        for pid, child in self.children.items():
            if _reap(pid, child.pid, frozen):
                self._tell_reaper(f"reaped {child.pid}")
        self.children.clear()
        self.held.clear()
        if self._reaper:
            self._tell_reaper("done")
            with contextlib.suppress(OSError):
                self._reaper.stdin.close()  # type: ignore[union-attr]
            self._reaper.wait()
            self._reaper = None


def take(tree: FrozenTree, vmas: dict[int, list[Vma]], pages: dict[int, dict[int, VmaPages]]):
    """A Snapshot of the frozen tree, or None (logged) when the dump must copy frozen."""
    started = time.monotonic()
    window = _window_segments(tree, vmas, pages)
    size = sum(seg.end - seg.start for segs in window.values() for seg in segs)
    if size > PREFETCH_LIMIT:
        log.warning(
            "no copy-on-write snapshot: %d MiB of shared/DONTFORK/WIPEONFORK memory would "
            "have to be held; pages are copied with the tree frozen",
            size >> 20,
        )
        return None
    snap = Snapshot()
    try:
        snap._start_reaper()
        for pid in tree.pids:
            snap._spawn(pid, _live_thread(pid, tree.threads[pid]))
        for pid, child in snap.children.items():
            window[pid] = window.get(pid, []) + _missing_in_child(pid, child.pid, vmas[pid], pages)
        for pid, segs in window.items():
            snap.held.setdefault(pid, _HeldMemory()).read(pid, segs)
    except OSError as err:
        snap.release(frozen=True)
        log.warning(
            "no copy-on-write snapshot (%s): pages are copied with the tree frozen", err.strerror
        )
        return None
    except BaseException:
        snap.release(frozen=True)
        raise
    snap.take_us = int((time.monotonic() - started) * 1e6)
    return snap


def _window_segments(tree, vmas, pages) -> dict[int, list[Segment]]:
    """Per pid, the data segments a child cannot show: read while frozen."""
    window: dict[int, list[Segment]] = {}
    for pid in tree.pids:
        unforked = [v for v in vmas[pid] if v.policy is Policy.WHOLE or _not_forked(v)]
        window[pid] = [s for s in private_plan(pid, unforked, pages[pid]) if s.where == "data"]
    for plan in shared_plans({pid: vmas[pid] for pid in tree.pids}).values():
        for seg in plan:
            window.setdefault(seg.pid, []).append(seg)
    return window


def _not_forked(vma: Vma) -> bool:
    return vma.policy is Policy.PRIVATE and any(f in vma.vmflags for f in NOT_FORKED)


def _missing_in_child(pid: int, child: int, vmas: list[Vma], pages) -> list[Segment]:
    """Private VMAs the child lacks: made DONTFORK after their flags were read."""
    present = {(m.start, m.end) for m in proc.read_maps(child)}
    missing = [
        v
        for v in vmas
        if v.policy is Policy.PRIVATE and not _not_forked(v) and (v.start, v.end) not in present
    ]
    return [s for s in private_plan(pid, missing, pages[pid]) if s.where == "data"]


def _live_thread(pid: int, tids: list[int]) -> int:
    """The main thread, or the first live one (a main thread that called
    pthread_exit cannot run a syscall)."""
    for tid in [pid] + tids if pid in tids else tids:
        if proc.read_task_state(pid, tid) not in ("Z", "X"):
            return tid
    raise TargetError(f"process {pid} has no live thread to clone")


def _reap(pid: int, child: int, frozen: bool) -> bool:
    """Wait for the dead child inside its parent, stopping the parent briefly if it runs."""
    try:
        if frozen:
            with SyscallSession(_live_thread(pid, proc.list_threads(pid))) as session:
                reaped = cowchild.reap(session, child)
        else:
            with stopped_thread(pid) as tid, SyscallSession(tid) as session:
                reaped = cowchild.reap(session, child)
    except TargetError:
        return False  # the parent is gone: init reaps its orphans
    if not reaped:
        log.warning("copy-on-write child %d of %d could not be reaped", child, pid)
    return reaped


class _HeldMemory:
    """Ranges of a process's memory read in the frozen window, by address."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.data: list[bytearray] = []

    def read(self, pid: int, segs: list[Segment]) -> None:
        if not segs:
            return
        with MemReader(pid) as reader:
            for seg in segs:
                buf = bytearray(seg.end - seg.start)
                n = reader.read_into(seg.vaddr, buf)
                index = bisect.bisect(self.starts, seg.vaddr)
                self.starts.insert(index, seg.vaddr)
                self.data.insert(index, buf[:n] if n < len(buf) else buf)

    def find(self, addr: int) -> tuple[bytearray, int] | None:
        """The held buffer covering addr and addr's offset in it."""
        index = bisect.bisect_right(self.starts, addr) - 1
        if index >= 0 and addr - self.starts[index] < len(self.data[index]):
            return self.data[index], addr - self.starts[index]
        return None


class SnapshotReader:
    """Reads one process's memory as it was at the freeze: held ranges from memory,
    everything else from its copy-on-write child. (MemReader's read_into contract.)"""

    def __init__(self, child: int, held: _HeldMemory) -> None:
        self.child = MemReader(child)
        self.held = held

    def read_into(self, addr: int, buf) -> int:
        found = self.held.find(addr)
        if found is None:
            return self.child.read_into(addr, buf)
        data, off = found
        n = min(len(buf), len(data) - off)
        buf[:n] = data[off : off + n]
        return n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.child.close()
