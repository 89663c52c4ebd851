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
A small process (under SMALL_PROCESS bytes of anonymous memory resident) gets no
child: all its memory is read in the window, which costs about what its clone
would. A child outlives a process that exits right after the thaw (cowchild.py).
A tree with few pages to copy (a tracker says under 1/COPY_VS_CLONE of the present
bytes: the final dump of a converged chain) gets no child either: the pages to copy
are read in the window into memory (at most CAPTURE_LIMIT bytes), and compressed and
written after the thaw. Reading them costs a fraction of the copy they would
otherwise need frozen.
Above PREFETCH_LIMIT bytes of memory to hold, or when the clone fails (strict
overcommit: ENOMEM; a pids limit: EAGAIN), there is no snapshot: the dump copies
with the tree frozen, as without this module, and says so.

Dirty tracking (soft-dirty, uffd-wp) was read and reset in the original before
the clone and stays with the original: a child never has it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import select
import subprocess
import sys
import time

from checkpointer import interrupt
from checkpointer.copier import Segment
from checkpointer.errors import TargetError
from checkpointer.freezer import FrozenTree, stopped_thread
from checkpointer.kernel import cowchild, proc
from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.memory import MemReader
from checkpointer.pageruns import Range, normalize
from checkpointer.plan import data_segments, shared_plans
from checkpointer.trackers import FullTracker, VmaPages
from checkpointer.vmas import Policy, Vma

log = logging.getLogger("checkpointer")

# Memory read inside the window and held until copied (shared, DONTFORK, WIPEONFORK).
PREFETCH_LIMIT = 256 << 20
# A frozen copy of fewer than 1/COPY_VS_CLONE of the present bytes beats the clone.
COPY_VS_CLONE = 16
# Pages to copy read into memory in the window, instead of compressed and written
# there, up to this many bytes (the tool's memory: it stays under 100 MiB).
CAPTURE_LIMIT = 32 << 20
# How long the dump waits for its watchdog to start before freezing anyway.
READY_TIMEOUT = 2.0
# Anonymous memory resident under which a process is read whole in the window.
SMALL_PROCESS = 4 << 20
# VmFlags of regions a forked child does not get as they are.
NOT_FORKED = ("dc", "wf")


class Watchdog:
    """The process that reaps the children should this tool die (reaper.py). Started
    before the freeze, and waited for (`wait_ready`) before it: an interpreter's
    start-up costs tens of milliseconds of CPU, which on a small machine would be
    taken from the frozen window (measured: the injected state reads took 4-13 ms
    instead of 1.1 ms while it started on the other core)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "checkpointer.reaper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        except OSError as err:
            # E.g. a user who may not run the interpreter's path again. The children
            # still die with the tool; only their reaping would be lost if it died.
            log.info("no snapshot watchdog (%s): a killed dump would leave zombies", err)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Until the watchdog runs (it says "ready"), at most `timeout` seconds: a slow
        start only costs the window some CPU, never correctness."""
        if not (self._proc and self._proc.stdout):
            return False
        out = self._proc.stdout
        try:
            if select.select([out], [], [], timeout)[0]:
                return out.readline().strip() == "ready"
        except (OSError, ValueError):
            pass
        log.debug("snapshot watchdog not ready after %.1f s; freezing anyway", timeout)
        return False

    def tell(self, line: str) -> None:
        if self._proc and self._proc.stdin:
            with contextlib.suppress(OSError):
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()

    def close(self) -> None:
        """All children are reaped: let it go (it exits by itself; not waited for, so
        the dump does not wait for an interpreter to start)."""
        if self._proc:
            self.tell("done")
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(OSError):
                self._proc.stdout.close()  # type: ignore[union-attr]
            self._proc = None


class Snapshot:
    """Copy-on-write children of a frozen tree, plus what they cannot show."""

    def __init__(self, watchdog: Watchdog) -> None:
        self.children: dict[int, cowchild.CowChild] = {}  # target pid -> its child
        self.held: dict[int, _HeldMemory] = {}  # target pid -> memory read in the window
        self.whole: set[int] = set()  # small processes read whole in the window: no child
        # owner -> plan of each shared object, as made in the window: the copy must
        # follow it (a plan made later may read pages populated since, not held)
        self.shared_plans: dict[str, list[Segment]] = {}
        # target pid -> pages of the VMAs read in the window, when the dump left the
        # scan of the rest to the children (scan())
        self.window_pages: dict[int, dict[int, VmaPages]] = {}
        self.take_us = 0
        self.watchdog = watchdog
        # "copy-on-write" (children), or "captured" (every page to copy held)
        self.kind = "copy-on-write"

    def _spawn(self, pid: int, tid: int) -> None:
        # Deferred: a ^C or SIGTERM between the clone and here would leave the child
        # (and the code page) in the target with nobody knowing of it; raised once
        # `release` can find the child.
        with interrupt.deferred():
            child = cowchild.spawn(tid, pid)
            self.children[pid] = child
            self.watchdog.tell(f"{pid} {child.pid} {child.ns_pid}")

    def scan(self, vmas: dict[int, list[Vma]]) -> dict[int, dict[int, VmaPages]]:
        """Present pages of every private VMA, read in the children (after the thaw)
        where they have the memory, else as read in the window."""
        pages = {pid: self.window_pages[pid] for pid in self.whole}
        for pid, child in self.children.items():
            held = self.window_pages.get(pid, {})
            forked = [v for v in vmas[pid] if v.policy is Policy.PRIVATE and v.start not in held]
            pages[pid] = {**FullTracker().scan(child.pid, forked, False), **held}
        return pages

    def readers(self) -> dict[int, SnapshotReader]:
        """A memory reader per target pid, for the page copier."""
        readers = {pid: SnapshotReader(pid, None, self.held[pid]) for pid in self.whole}
        for pid, child in self.children.items():
            readers[pid] = SnapshotReader(pid, child.pid, self.held.get(pid, _HeldMemory()))
        return readers

    def kill(self) -> None:
        """SIGKILL every child once its memory is read; `release` then reaps them.
        Their teardown runs beside the images' fsync instead of before it."""
        for child in self.children.values():
            cowchild.send_kill(child)

    def release(self, frozen: bool = False) -> None:
        """Kill every child and reap it in its parent, leaving no trace. `frozen`: the
        parents are still in our ptrace stop (no need to stop them again). Deferred:
        a second ^C must not cut the reaping short."""
        with interrupt.deferred():
            for child in self.children.values():
                cowchild.kill(child)
            for pid, child in self.children.items():
                if _reap(pid, child, frozen):
                    self.watchdog.tell(f"reaped {child.pid}")
            self.children.clear()
            self.held.clear()
            self.watchdog.close()


def take(
    tree: FrozenTree,
    vmas: dict[int, list[Vma]],
    pages: dict[int, dict[int, VmaPages]] | None,
    watchdog: Watchdog,
    parent_held: dict[int, list[Range]] | None = None,
) -> Snapshot | None:
    """A Snapshot of the frozen tree, or None (logged) when the dump must copy frozen.

    `pages`: what the tracker read in the window; None for a dump with nothing to
    reset, whose scan can wait for the children (Snapshot.scan) but for the memory
    read here. `parent_held`: per pid, what the parent chain holds (as the copy
    will plan with it), for a capture of only the pages the copy will read."""
    started = time.monotonic()
    held = _held_bytes(tree, vmas)
    scanned: dict[int, dict[int, VmaPages]] = {}  # the not-forked VMAs, for _hold
    if held > PREFETCH_LIMIT:  # reservations count their pages, not their size
        if pages is None:
            scanned = _scan_not_forked(tree, vmas)
        held = _held_bytes(tree, vmas, pages or scanned)
    if held > PREFETCH_LIMIT:
        watchdog.close()
        log.warning(
            "no copy-on-write snapshot: %d MiB of shared/DONTFORK/WIPEONFORK memory would "
            "have to be held; pages are copied with the tree frozen",
            held >> 20,
        )
        return None
    if pages is not None and few_to_copy(pages):
        log.debug("no copy-on-write children: few pages to copy")
        snap = _capture(tree, vmas, pages, watchdog, parent_held or {})
        if snap is None:
            watchdog.close()
        else:
            snap.take_us = _us_since(started)
            log.debug("snapshot: pages to copy captured in %d us", snap.take_us)
        return snap
    snap = Snapshot(watchdog)
    try:
        snap.whole = {pid for pid in tree.pids if _small(pid)}
        for pid in tree.pids:
            if pid not in snap.whole:
                snap._spawn(pid, _live_thread(pid, tree.threads[pid]))
        log.debug("snapshot: children cloned at %d us", _us_since(started))
        for pid in tree.pids:
            child = snap.children.get(pid)
            if child:  # what its child does not have as it was
                unforked = [v for v in vmas[pid] if _held(v) and not v.shared]
                unforked += _missing_in_child(child.pid, vmas[pid])
            else:  # a small process: all its own memory
                unforked = [v for v in vmas[pid] if v.policy in (Policy.PRIVATE, Policy.WHOLE)]
            _hold(snap, pid, unforked, pages[pid] if pages else None, scanned.get(pid, {}))
        snap.shared_plans = shared_plans({pid: vmas[pid] for pid in tree.pids})
        for pid, segs in _data_by_reader(snap.shared_plans).items():
            snap.held.setdefault(pid, _HeldMemory()).read(pid, segs)
        # Inside the try: an interruption here must still release the children.
        snap.take_us = _us_since(started)
        log.debug("snapshot: taken in %d us", snap.take_us)
        return snap
    except OSError as err:
        snap.release(frozen=True)
        interrupt.check()  # one deferred by the release: not on to a frozen copy
        log.warning(
            "no copy-on-write snapshot (%s): pages are copied with the tree frozen", err.strerror
        )
        return None
    except BaseException:
        snap.release(frozen=True)
        raise


def _scan_not_forked(
    tree: FrozenTree, vmas: dict[int, list[Vma]]
) -> dict[int, dict[int, VmaPages]]:
    """The present pages of each private VMA no child gets as it is (DONTFORK,
    WIPEONFORK): what the window holds of them."""
    return {
        pid: FullTracker().scan(pid, [v for v in vmas[pid] if _not_forked(v)], False)
        for pid in tree.pids
    }


def _held_bytes(
    tree: FrozenTree,
    vmas: dict[int, list[Vma]],
    pages: dict[int, dict[int, VmaPages]] | None = None,
) -> int:
    """What the window would read and hold: shared objects at their mapped extents
    and [vdso] at its size (upper bounds), the private VMAs no child gets at their
    present pages (`pages`), or, without them, at their size. V8 (Node.js) reserves
    ~1.5 GiB of PROT_NONE, DONTFORK address space and uses a few MiB of it."""
    total = _shared_bytes(tree, vmas)
    for pid in tree.pids:
        for v in vmas[pid]:
            if pages is not None and _not_forked(v):
                total += sum(e - s for s, e in pages[pid][v.start].present)
            elif _held(v) and not v.shmem_owner:
                total += v.size
    return total


def _shared_bytes(tree: FrozenTree, vmas: dict[int, list[Vma]]) -> int:
    """The shared objects' mapped extents, each counted once however many times
    the tree maps it (ZGC maps its heap, one memfd, at three addresses), as the
    copy plans them (plan.shared_plans)."""
    extents: dict[str, list[Range]] = {}
    for pid in tree.pids:
        for v in vmas[pid]:
            if v.shmem_owner:
                extents.setdefault(v.shmem_owner, []).append((v.offset, v.offset + v.size))
    return sum(e - s for ranges in extents.values() for s, e in normalize(ranges))


def _capture(
    tree: FrozenTree,
    vmas: dict[int, list[Vma]],
    pages: dict[int, dict[int, VmaPages]],
    watchdog: Watchdog,
    parent_held: dict[int, list[Range]],
) -> Snapshot | None:
    """A Snapshot without children: every page the copy will read (its plans, made
    from the same pages and parent holdings) read now and held; None above
    CAPTURE_LIMIT bytes."""
    segs = {
        pid: data_segments(pid, vmas[pid], pages[pid], parent_held.get(pid, []))
        for pid in tree.pids
    }
    plans = shared_plans({pid: vmas[pid] for pid in tree.pids})
    for pid, shared in _data_by_reader(plans).items():
        segs[pid] += shared
    size = sum(s.end - s.start for pid_segs in segs.values() for s in pid_segs)
    if size > CAPTURE_LIMIT:
        log.debug("no capture: %d MiB to copy", size >> 20)
        return None
    snap = Snapshot(watchdog)
    snap.kind = "captured"
    snap.whole = set(tree.pids)
    snap.shared_plans = plans
    try:
        for pid, pid_segs in segs.items():
            snap.held[pid] = _HeldMemory()
            snap.held[pid].read(pid, pid_segs)
    except BaseException:
        snap.release(frozen=True)
        raise
    return snap


def _data_by_reader(plans: dict[str, list[Segment]]) -> dict[int, list[Segment]]:
    """The data segments of the shared objects' plans (MAP_SHARED memory is the same
    in a child, so it is read in the window), by the process each is read through."""
    by_pid: dict[int, list[Segment]] = {}
    for plan in plans.values():
        for seg in plan:
            if seg.where == "data":
                by_pid.setdefault(seg.pid, []).append(seg)
    return by_pid


def _small(pid: int) -> bool:
    try:
        rss_anon = int(proc.read_status(pid)["RssAnon"].split()[0]) << 10
    except (TargetError, KeyError, ValueError):
        return False  # (a zombie main thread's status has no RssAnon: clone a thread)
    return rss_anon < SMALL_PROCESS


def _hold(
    snap: Snapshot, pid: int, unforked: list[Vma], pages, scanned: dict[int, VmaPages]
) -> None:
    """Read the private memory no child has as it was (and [vdso]): what its child
    lacks, or all of a small process's. `scanned`: VMAs of it the window has
    scanned already (take's limit check), not scanned again."""
    if pages is None:
        private = [v for v in unforked if v.policy is Policy.PRIVATE]
        rest = [v for v in private if v.start not in scanned]
        pages = snap.window_pages[pid] = {
            **{v.start: scanned[v.start] for v in private if v.start in scanned},
            **FullTracker().scan(pid, rest, False),
        }
    # No parent holdings: hold every page the later plan could copy (a superset).
    segs = data_segments(pid, unforked, pages, [])
    snap.held.setdefault(pid, _HeldMemory()).read(pid, segs)


def few_to_copy(pages: dict[int, dict[int, VmaPages]]) -> bool:
    """Whether the pages to copy are so few that reading them frozen is quicker than
    the clone, which costs about as much as copying 1/16 of the present pages
    (page tables: ~30-100 ms per GiB here; the copy: ~2 GB/s). The final dump of a
    converged chain, which copies only the last hot set, is the case."""
    present = copy = 0
    for by_vma in pages.values():
        for vp in by_vma.values():
            present += sum(e - s for s, e in vp.present)
            copy += sum(e - s for s, e in (vp.present if vp.dirty is None else vp.dirty))
    return copy * COPY_VS_CLONE < present


def _us_since(t: float) -> int:
    return int((time.monotonic() - t) * 1e6)


def _held(vma: Vma) -> bool:
    """Read in the window: what a child does not have as it was."""
    return vma.policy in (Policy.WHOLE, Policy.SHARED) or _not_forked(vma)


def _not_forked(vma: Vma) -> bool:
    return vma.policy is Policy.PRIVATE and any(f in vma.vmflags for f in NOT_FORKED)


def _missing_in_child(child: int, vmas: list[Vma]) -> list[Vma]:
    """Private VMAs the child lacks: made DONTFORK after their flags were read."""
    present = {(m.start, m.end) for m in proc.read_maps(child)}
    return [
        v
        for v in vmas
        if v.policy is Policy.PRIVATE and not _not_forked(v) and (v.start, v.end) not in present
    ]


def _live_thread(pid: int, tids: list[int]) -> int:
    """The main thread, or the first live one (a main thread that called
    pthread_exit cannot run a syscall)."""
    for tid in [pid] + tids if pid in tids else tids:
        if proc.read_state(pid, tid) not in ("Z", "X"):
            return tid
    raise TargetError(f"process {pid} has no live thread to clone")


def _reap(pid: int, child: cowchild.CowChild, frozen: bool) -> bool:
    """Wait for the dead child inside its parent, stopping the parent briefly if it runs."""
    if not os.path.exists(f"/proc/{child.pid}"):
        # Re-parented when its parent exited, and reaped by its new parent: the
        # parent's pid may be another process's by now.
        return True
    try:
        if frozen:
            with SyscallSession(_live_thread(pid, proc.list_threads(pid))) as session:
                reaped = cowchild.reap(session, child.ns_pid, child.pid)
        else:
            with stopped_thread(pid) as tid, SyscallSession(tid) as session:
                reaped = cowchild.reap(session, child.ns_pid, child.pid)
    except TargetError:
        return False  # the parent is gone: init reaps its orphans
    if not reaped:
        log.warning("copy-on-write child %d of %d could not be reaped", child.pid, pid)
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
    everything else from its copy-on-write child, if it has one. (MemReader's
    read_into contract.)"""

    def __init__(self, pid: int, child: int | None, held: _HeldMemory) -> None:
        self.pid = pid
        self.held = held
        self.child = None
        if child is not None:
            try:
                self.child = MemReader(child)
            except TargetError:
                raise self._lost() from None

    def _lost(self) -> TargetError:
        return TargetError(
            f"the copy-on-write snapshot of process {self.pid} was killed before its "
            "memory was read: dump again, or with --no-snapshot"
        )

    def read_into(self, addr: int, buf) -> int:
        found = self.held.find(addr)
        if found is None:
            if self.child is None:
                return 0
            got = self.child.read_into(addr, buf)
            if not got:  # its mm is gone: the child was killed
                raise self._lost()
            return got
        data, off = found
        n = min(len(buf), len(data) - off)
        buf[:n] = data[off : off + n]
        return n

    def close(self) -> None:
        if self.child is not None:
            with contextlib.suppress(OSError):
                self.child.close()
