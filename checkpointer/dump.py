"""dump and pre-dump: freeze, collect, track, copy, write, thaw.

A final dump keeps the tree frozen from the first register read to the last
page written, so the images describe one instant. A pre-dump only needs the
dirty information to be read and reset at one instant (for soft-dirty, with the
tree frozen; for uffd-wp and full, not even that); the pages are copied while
the tree runs, because any page written after the reset is dirty next time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from checkpointer import collect, memdump, snapshot, trackstate
from checkpointer.errors import CheckpointError, ImageError, TargetError
from checkpointer.fdstate import tree as fdtree
from checkpointer.freezer import (
    Freezer,
    FrozenTree,
    ProcessFreezer,
    Thaw,
    descendants,
    live_tree,
    parents_in,
    stopped_thread,
)
from checkpointer.images import (
    FROZEN_INCREMENTAL_LEVEL,
    FROZEN_LEVEL,
    PAGE_LEVEL,
    Dump,
    DumpWriter,
)
from checkpointer.kernel import proc, ptrace
from checkpointer.pageruns import Range
from checkpointer.trackers import TRACKERS, FullTracker, Tracker, VmaPages, make_tracker
from checkpointer.untrack import remove_traces
from checkpointer.vmas import Policy, Vma, unsupported

log = logging.getLogger("checkpointer")


@dataclass
class DumpRequest:
    pid: int
    images_dir: Path
    kind: str = "dump"  # or "pre-dump"
    prev_images_dir: str | None = None  # relative to images_dir, as in CRIU
    tracker: str = "auto"
    track_mem: bool = False  # reset tracking so a later dump can build on this one
    thaw: Thaw = Thaw.KILL
    tcp_established: bool = False  # dump established TCP connections (repair mode)
    # A tree left stopped keeps its connections in repair mode and locked, for a
    # restore elsewhere; the caller releases them (DumpResult.connections).
    hold_connections: bool = False
    cgroup: str | None = None
    progress: bool | None = None  # None: only when stderr is a terminal
    iteration: int | None = None
    # zstd level of page data; None: fast for a frozen dump, smaller for a pre-dump
    compress_level: int | None = None
    # The tree may use a terminal and session outside it (CRIU's --shell-job).
    shell_job: bool = False
    # Thaw a leave-running dump as soon as a copy-on-write child of each process
    # holds its memory (snapshot.py), instead of after the copy.
    snapshot: bool = True

    def __post_init__(self) -> None:
        self.images_dir = Path(self.images_dir)

    @property
    def page_level(self) -> int:
        if self.compress_level is not None:
            return self.compress_level
        if self.kind != "dump":
            return PAGE_LEVEL
        return FROZEN_LEVEL if self.prev_images_dir is None else FROZEN_INCREMENTAL_LEVEL


@dataclass
class DumpResult:
    path: Path
    stats: dict
    tracker: str
    incremental: bool
    full_pass_reason: str | None = None
    pids: list[int] = field(default_factory=list)
    # Processes that got a full pass of their own in an incremental pass, and why
    # (new since the parent, another process with a reused PID, exec'd, tracking lost).
    full_pids: dict[int, str] = field(default_factory=dict)
    # The established connections still in repair mode and locked (hold_connections).
    connections: fdtree.RepairedConnections | None = None


def pre_dump(req: DumpRequest) -> DumpResult:
    req.kind = "pre-dump"
    req.track_mem = True
    req.thaw = Thaw.RUNNING
    return run(req)


def dump(req: DumpRequest) -> DumpResult:
    req.kind = "dump"
    return run(req)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the images' file system is full


class VmFlagsChanged(CheckpointError):
    """Flags read before the freeze were not those of the instant: dump again."""


def run(req: DumpRequest) -> DumpResult:
    proc.require_process(req.pid)
    with trackstate.target_lock(req.pid):
        try:
            try:
                return _Pass(req).run()
            except VmFlagsChanged as err:
                # Nothing was committed. Rare (a madvise or mlock of a whole VMA
                # between the early read and the freeze): the second pass reads the
                # flags with the tree frozen.
                log.warning("%s; dumping again with the flags read frozen", err)
                return _Pass(req, early_flags=False).run()
        except (OSError, TargetError) as err:
            # A traced process killed mid-dump stays a zombie until we detach.
            if proc.wait_exited(req.pid, timeout=1.0):
                raise TargetError(
                    f"process {req.pid} exited during the {req.kind}; no image was written"
                ) from err
            if isinstance(err, OSError) and err.errno in _FULL and not err.filename:
                # Raised by a writer thread, naming nothing: where it was writing.
                raise OSError(err.errno, err.strerror, str(req.images_dir)) from err
            raise


class _Pass:
    """One dump or pre-dump of one tree."""

    def __init__(self, req: DumpRequest, early_flags: bool = True) -> None:
        self.req = req
        # Read the VMAs' smaps flags before the freeze (checked at the instant later).
        self.early_flags = early_flags
        self.reused_flags: set[int] = set()  # pids whose flags were read before it
        self.dump_id = uuid.uuid4().hex
        self.parent: Dump | None = None
        self.parent_link: str | None = None
        self.tracker: Tracker | None = None
        self.incremental = False
        self.full_pass_reason: str | None = None
        self.state: trackstate.TrackState | None = None
        # a pass that tracks nothing: what earlier passes recorded (their traces)
        self.recorded: trackstate.TrackState | None = None
        self.times: dict[str, int] = {"freezing_time": 0, "frozen_time": 0}
        self.start_times: dict[int, int] = {}  # read once the tree is known
        self.full_pids: dict[int, str] = {}  # pid -> why it gets a full pass
        self.frozen = False
        self.contents: dict[str, tuple] = {}  # owner -> where to read a whole file
        self.mapped_files: dict = {}  # what this pass found out about mapped files
        self.parent_auxv: dict[int, bytes | None] = {}
        self.connections = fdtree.RepairedConnections()
        self.inherited: dict[int, set[int]] = {}  # pid -> tracker fds it got by fork
        self._capture_likely = False  # (_predict_capture)
        self._records_due: list[tuple[Callable, tuple]] = []  # (_write_later)

    # The order of this method is the algorithm.
    def run(self) -> DumpResult:
        req = self.req
        _refuse_own_tree(req.pid)
        start_time = collect.start_time(req.pid)
        self._open_parent(start_time)
        self._choose_tracker(start_time)
        self._capture_likely = self._predict_capture()
        freeze = req.kind == "dump" or (self.tracker is not None and self.tracker.freezes_pre_dump)
        freezer = Freezer(req.pid, thaw=req.thaw, cgroup=req.cgroup)
        watchdog = snapshot.Watchdog() if self._snapshots(freeze) else None
        snap: snapshot.Snapshot | None = None
        try:
            with DumpWriter(
                req.images_dir, kind=req.kind, parent=self.parent_link, level=req.page_level
            ) as writer:
                # The memory maps with their smaps flags, read while the tree still
                # runs; a frozen pass re-reads only the cheap maps file (collect.py).
                # Locked sizes first: an mlock after this read shows in the window.
                locked = (
                    {pid: _locked(pid) for pid in live_tree(req.pid).pids}
                    if freeze and self.early_flags
                    else {}
                )
                known = {pid: _vmas_or_none(pid) for pid in locked}
                # What the parent chain holds is read from its page indexes, which
                # never change: before the freeze, not inside it.
                for pid in known if self.parent else ():
                    self.parent.held_ranges(f"pid-{pid}")
                    self._parent_auxv(pid)
                if watchdog:
                    watchdog.wait_ready()  # its start-up would share the CPU with the window
                tree = self._freeze(freezer) if freeze else live_tree(req.pid)
                if not freeze and self.tracker is not None and self.tracker.stops_running:
                    # The tree runs: the tracker stops and injects into one process
                    # after another, and a member it found it cannot seize only then
                    # would leave those before it tracked by a refused pass.
                    _check_seizable(tree)
                frozen_at = time.monotonic()
                self._identify(tree, start_time)
                self.frozen = freeze
                vmas = self._read_vmas(tree, known, locked)
                self._write_state(writer, tree, vmas)
                log.debug("state collected in %d us", _us_since(frozen_at))
                # Nothing to reset: the copy-on-write children can be scanned later.
                later = watchdog is not None and self.tracker is None
                # The flags check's smaps walk, beside a capture (a frozen copy's
                # Python would keep it from the GIL; kill mode: beside the fsync);
                # where a capture is likely, beside the tracker's scan already.
                early: list[collect.SmapsReader | None] = []
                if watchdog is not None and self._capture_likely:
                    start_walk = lambda: early.append(self._smaps_reader())  # noqa: E731
                    pages = self._track(tree, vmas, frozen=freeze, prepared=start_walk)
                else:
                    pages = None if later else self._track(tree, vmas, frozen=freeze)
                log.debug("tracking read and reset at %d us", _us_since(frozen_at))
                capture = watchdog is not None and pages is not None and snapshot.few_to_copy(pages)
                smaps = (early[0] if early else self._smaps_reader()) if capture else None
                snap = (
                    snapshot.take(tree, vmas, pages, watchdog, self._parents_held(tree))
                    if watchdog
                    else None
                )
                if snap and snap.whole:  # no child holds their flags: checked frozen
                    self._check_vmflags({pid: vmas[pid] for pid in snap.whole}, smaps=smaps)
                # A child holds memory still, not a file: memfds and deleted files
                # are read whole (contents.py) before the tree runs on.
                files = memdump.copy_whole_files(writer, self.contents) if snap else None
                if snap or (req.kind == "pre-dump" and freeze):
                    self._thaw(freezer, Thaw.RUNNING)  # dirty state is read and reset
                    self.times["frozen_time"] = _us_since(frozen_at)
                self._write_records_due()  # after the thaw where there is one
                if pages is None:
                    pages = snap.scan(vmas) if snap else self._track(tree, vmas, frozen=freeze)
                try:
                    if snap:
                        # The children hold the flags of the instant (not the locks).
                        children = {p: c.pid for p, c in snap.children.items()}
                        self._check_vmflags({p: vmas[p] for p in children}, children)
                    stats = self._copy(writer, tree, vmas, pages, snap, files)
                finally:
                    if snap:  # their memory is torn down beside the fsync
                        snap.kill()
                log.debug("pages copied at %d us", _us_since(frozen_at))
                if req.kind == "dump" and not snap:
                    if req.thaw is not Thaw.KILL:
                        self._check_vmflags(vmas, smaps=smaps)  # before the tree runs again
                        # Every byte is read; fsync and rename need not keep the
                        # target waiting. (A tree to kill stays frozen until the
                        # images are safe.)
                        self._thaw(freezer, req.thaw)
                    self.times["frozen_time"] = _us_since(frozen_at)
                    if req.thaw is Thaw.KILL:
                        # Every byte is read; still frozen until killed after commit.
                        # The check's smaps walk (CPU) runs beside the fsync (I/O).
                        smaps = self._smaps_reader()
                        writer.sync()
                        self._check_vmflags(vmas, smaps=smaps)
                stats.update(self.times)
                writer.write_stats(stats)
                # A pre-dump tolerates short reads of a running tree (a VMA unmapped
                # meanwhile), so a root that died mid-copy would commit a hollow dump.
                # (A dump read everything frozen: the target may exit once let go.)
                if req.kind == "pre-dump" and (
                    proc.wait_exited(req.pid, timeout=0)
                    or collect.start_time(req.pid) != start_time
                ):
                    raise TargetError(f"process {req.pid} exited during the {req.kind}")
                writer.commit(self._inventory(tree, start_time))
                if snap:
                    snap.release()
        except BaseException:
            if snap:
                snap.release()
            self.connections.release()
            try:
                freezer.thaw(Thaw.RUNNING)
            except TargetError as err:
                log.error("%s", err)  # said, but the error that ended the pass wins
            freezer.undo_stop()  # if it was already thawed into a stop we asked for
            if self.tracker:
                self.tracker.close()
            raise
        self._remember_reset()
        self._thaw(freezer, req.thaw)
        if self.tracker:
            self.tracker.close()
        held = self.connections if self.connections.held else None
        return DumpResult(
            req.images_dir,
            stats,
            self._tracker_name(),
            self.incremental,
            self.full_pass_reason,
            tree.pids,
            self.full_pids,
            held,
        )

    def _thaw(self, freezer: Freezer, thaw: Thaw) -> None:
        """Let the tree go. A tree that runs on gets its TCP connections back first,
        and so does a stopped one unless the caller holds them for a restore
        elsewhere. A killed tree closes them silently in repair mode; they stay
        locked until the restore."""
        if thaw is Thaw.RUNNING or (thaw is Thaw.STOPPED and not self.req.hold_connections):
            self.connections.release()
        freezer.thaw(thaw)

    # -- before the freeze ---------------------------------------------------

    def _open_parent(self, start_time: int) -> None:
        rel = self.req.prev_images_dir
        if rel is None:
            return
        # Lexically, as CRIU does relative to the images dir (which may not exist yet).
        path = Path(os.path.normpath(self.req.images_dir / rel))  # absolute stays absolute
        self.parent = Dump.open(path)
        # Stored relative, like CRIU's parent symlink, so a chain moves as a whole.
        self.parent_link = os.path.relpath(path, self.req.images_dir)
        theirs = self.parent.inventory.get("start_times", {}).get(str(self.req.pid))
        if theirs != start_time:
            raise TargetError(
                f"parent {path} was taken from another process with pid {self.req.pid} "
                f"(start time {theirs}, now {start_time})"
            )

    def _predict_capture(self) -> bool:
        """Will this final dump copy few pages (snapshot.few_to_copy), so that its
        flags check's smaps walk runs beside a capture? Likely if its parent pass
        copied few and the tracker tells which: then the walk starts beside the
        tracker's scan already. A wrong guess costs a copy-on-write clone a wait
        for the walk (the clone takes the mmap lock for writing)."""
        tracker = self.tracker
        if self.req.kind != "dump" or not (tracker and tracker.scan_only_reads and self.parent):
            return False
        if tracker.compares_content:  # (the full tracker: every present page is copied)
            return False
        try:
            stats = self.parent.stats or {}
        except ImageError:
            return False
        written, scanned = stats.get("pages_written", 0), stats.get("pages_scanned", 0)
        return written * snapshot.COPY_VS_CLONE < scanned

    def _choose_tracker(self, start_time: int) -> None:
        req = self.req
        recorded = trackstate.load(req.pid, start_time)
        if not (req.track_mem or self.parent):
            # A plain full dump: no tracking read or reset. What earlier passes'
            # tracking put into the tree stays, hidden from the records.
            self.recorded = recorded
            return
        self.tracker = make_tracker(req.tracker)
        if recorded is not None and recorded.tracker != self.tracker.name:
            # That tracker's chain ends here. Its traces leave the tree first: the
            # records would show them, and a later pass of it would add another.
            if remove_traces(recorded):
                log.info("removed the %s tracking of earlier passes", recorded.tracker)
            trackstate.forget(req.pid)
            recorded = None
        self.state = recorded or trackstate.TrackState(req.pid, start_time, self.tracker.name)
        if self.parent is None:
            return
        parent_id = self.parent.inventory.get("tracking", {}).get("dump_id")
        if self.tracker.compares_content:
            self.incremental = True  # needs no kernel state, only the parent's pages
        elif not self.state.trusts(parent_id, self.tracker.name):
            self.full_pass_reason = (
                "tracking state does not match the parent (a pass since it failed, "
                "or tracking was reset elsewhere): full pass"
            )
        elif why := self.tracker.lost(req.pid, self.state.extra.get(str(req.pid), {})):
            self.full_pass_reason = f"tracking was lost ({why}): full pass"
        else:
            self.incremental = True
        if self.full_pass_reason:
            log.warning("%s", self.full_pass_reason)

    def _freeze(self, freezer: Freezer) -> FrozenTree:
        tree = freezer.freeze()
        self.times["freezing_time"] = tree.freezing_time_us
        return tree

    def _identify(self, tree: FrozenTree, root_start_time: int) -> None:
        """Which processes are the ones the parent recorded under their PIDs.

        Read before any page is scanned: a process replaced after this moment is
        recorded under the old start time, so no later pass mistakes it for the
        new one. Every other process gets a full pass of its own.
        """
        self.start_times = {self.req.pid: root_start_time}
        for pid in tree.pids:
            if pid != self.req.pid:
                try:
                    self.start_times[pid] = collect.start_time(pid)
                except TargetError:
                    self.start_times[pid] = -1  # exited: it is dropped or fails later
        if self.parent is None:
            return
        theirs = self.parent.inventory.get("start_times", {})
        for pid in tree.pids:
            if str(pid) not in theirs or pid not in self.parent.pids:
                self.full_pids[pid] = "new since the parent"
            elif theirs[str(pid)] != self.start_times[pid]:
                self.full_pids[pid] = "another process than the parent's with this pid"
            elif self._exec_since_parent(pid):
                self.full_pids[pid] = "it ran exec since the parent"
        for pid, why in self.full_pids.items():
            log.info("process %d: full pass (%s)", pid, why)

    def _exec_since_parent(self, pid: int) -> bool:
        """exec keeps the PID and start time but replaces the memory, and with it
        the auxiliary vector (new stack, new AT_RANDOM bytes)."""
        theirs = self._parent_auxv(pid)
        try:
            return theirs is None or proc.read_auxv(pid) != theirs
        except (TargetError, OSError):
            return True

    def _parent_auxv(self, pid: int) -> bytes | None:
        """The auxiliary vector the parent recorded for pid (None: unreadable). Read
        once, before the freeze if the pid is known then."""
        if pid not in self.parent_auxv:
            try:
                self.parent_auxv[pid] = self.parent.mm(pid).mm["auxv"] if self.parent else None
            except (ImageError, OSError):
                self.parent_auxv[pid] = None
        return self.parent_auxv[pid]

    def _incremental_for(self, pid: int) -> bool:
        return self.incremental and pid not in self.full_pids

    # -- while frozen -------------------------------------------------------

    def _vanished(self, pid: int) -> bool:
        """May this pass go on without process `pid`? Only a pass that does not
        freeze sees processes exit, and only the root must last it (checked
        before commit). What was read of a vanished process is recorded under
        the start time read before the scan, so no later pass takes it for
        another process that gets its PID."""
        if self.frozen or pid == self.req.pid:
            return False
        try:
            # dying (its memory gone a moment before /proc calls it a zombie), or
            # reaped and the PID already taken by another process
            gone = proc.wait_exited(pid, timeout=0.2) or collect.start_time(
                pid
            ) != self.start_times.get(pid)
        except TargetError:
            gone = True
        if gone:
            log.info("process %d exited during the %s", pid, self.req.kind)
        return gone

    def _read_vmas(self, tree: FrozenTree, known: dict, locked: dict) -> dict[int, list[Vma]]:
        vmas = {}
        for pid in tree.pids:
            try:
                # A fork drops the lock flags, so a snapshot's children cannot show
                # an mlock since the early read: the locked size tells, cheaply.
                early = known.get(pid)
                if early is not None and _locked(pid) != locked.get(pid):
                    early = None
                vmas[pid], reused = collect.read_vmas_reusing(pid, early)
                if reused:
                    self.reused_flags.add(pid)
            except TargetError:
                if not self._vanished(pid):
                    raise
                del tree.threads[pid]  # not in this dump at all
                continue
            for vma in vmas[pid]:
                if why := unsupported(vma):
                    raise CheckpointError(
                        f"process {pid} maps {vma.start:x}-{vma.end:x} "
                        f"{vma.path or '(anonymous)'}: {why}; nothing was written"
                    )
        return vmas

    def _write_state(self, writer: DumpWriter, tree: FrozenTree, vmas: dict) -> None:
        while True:
            try:
                records = collect.pstree_records(tree)
                break
            except TargetError:
                gone = [pid for pid in tree.pids if self._vanished(pid)]
                if not gone:
                    raise
                for pid in gone:
                    del tree.threads[pid]
                    del vmas[pid]
        self._write_later(writer.write_pstree, records)
        status = collect.FrozenStatus()
        if self.req.kind == "dump":  # refusals of the whole process first
            collect.check_namespaces(tree.pids)
            collect.check_sharing(tree.pids)
            collect.check_seccomp(tree.threads, killing=self.req.thaw is Thaw.KILL, status=status)
        processes: dict[int, dict] = {}
        fds: dict[int, list[dict]] = {}
        vma_records: dict[int, list[dict]] = {}
        for pid in tree.pids:
            own_fds, own_flags = self._own_traces(pid)
            # Registers and injected syscalls need every thread in a ptrace stop (a
            # dump). The sessions' scratch page is gone before pages are tracked.
            injected = (
                collect.read_injected_state(pid, tree.threads[pid], status)
                if self.req.kind == "dump"
                else None
            )
            try:
                mm = collect.mm_record(pid, injected)
                vma_records[pid] = collect.vma_records(
                    pid,
                    vmas[pid],
                    final=injected is not None,
                    hide_flags=own_flags,
                    seen=self.mapped_files,
                )
            except TargetError:
                if not self._vanished(pid):
                    raise
                mm = None
            if mm is not None:
                self._write_later(writer.write_mm, pid, mm, vma_records[pid])
            if injected is not None:
                process, threads = collect.core_records(
                    pid, tree.threads[pid], pid in tree.was_stopped, injected, status
                )
                self._write_later(writer.write_core, pid, process, threads)
                processes[pid] = process
                fds[pid] = collect.fd_records(pid, own_fds)
        if self.req.kind == "dump":
            collect.check_terminals(records, processes, fds, self.req.shell_job)
        collect.mark_shared_descriptions(fds)
        if fds:
            collect.mark_mapping_locks(fds, vma_records)
        # With every fd of the tree known: refusals (a peer outside the tree, a
        # connection without --tcp-established), then TCP repair and locks.
        fdtree.check(fds, self.req.tcp_established, set(tree.pids) | set(tree.zombies))
        fdtree.repair_established(fds, self.connections)
        for pid, fd_recs in fds.items():
            self._write_later(writer.write_fds, pid, fd_recs)
        self.contents = collect.content_sources(fds, vma_records)

    def _write_later(self, write: Callable, *args) -> None:
        """The state records are collected frozen, but checked, encoded, compressed
        and written once the tree runs again where it does before its copy: that is
        Python work the window need not wait for (a third of the rest of a final
        dump's window in the soft-dirty guest, under TCG)."""
        self._records_due.append((write, args))

    def _write_records_due(self) -> None:
        for write, args in self._records_due:
            write(*args)
        self._records_due.clear()

    def _tracking_state(self, pid: int, track: trackstate.TrackState | None = None) -> dict:
        """The tracker's state for pid (in `track`, default this pass's), if it is
        this process's: not a former process's with the same PID (a pass of this
        one that failed after setting tracking up counts: it is what the target
        holds)."""
        track = track or self.state
        assert track is not None
        state = track.extra.get(str(pid), {})
        return state if state.get("start_time") == self.start_times.get(pid) else {}

    def _smaps_reader(self) -> collect.SmapsReader | None:
        """The smaps walk of the flags check (below), started on a thread, where the
        frozen tree's flags are checked: once nothing left in the window takes the
        mmap lock for writing (after tracking), and where the dump's own thread
        mostly waits in the kernel meanwhile (a capture's reads, an fsync). Beside
        a frozen copy's Python it would wait for the GIL after each of its reads:
        measured, a kill-mode copy took 38-47 ms instead of 16."""
        if self.req.kind != "dump" or not self.frozen or not self.reused_flags:
            return None
        return collect.SmapsReader(sorted(self.reused_flags))

    def _check_vmflags(
        self,
        vmas: dict[int, list[Vma]],
        children: dict | None = None,
        smaps: collect.SmapsReader | None = None,
    ) -> None:
        """Flags read before the freeze (a final dump's) must be those of the instant:
        read again from the frozen process (`smaps`: already being read), or from its
        copy-on-write child (`children`: pid -> child pid). The walk of smaps costs
        about as much as a pagemap scan, so it runs where it is cheapest: after the
        thaw for a snapshot, beside a capture, after the copy otherwise."""
        if self.req.kind != "dump":
            return
        for pid in sorted(self.reused_flags & set(vmas)):
            if children:
                now = proc.read_smaps_vmas(children[pid])
            else:
                now = smaps.smaps(pid) if smaps else proc.read_smaps_vmas(pid)
            if changed := collect.vmflags_changed(vmas[pid], now, forked=bool(children)):
                v, now = changed[0]
                raise VmFlagsChanged(
                    f"process {pid} changed the flags of {len(changed)} memory mapping(s) "
                    f"(first {v.start:x}-{v.end:x}: {' '.join(v.vmflags)} -> "
                    f"{' '.join(now) if now is not None else 'not mapped'}) while they "
                    "were read before the freeze"
                )

    def _own_traces(self, pid: int) -> tuple[set[int], set[str]]:
        """fds and VmFlags an earlier pass's tracker left in pid (not its own),
        and the fds of its parent's tracker it inherited through fork."""
        if self.tracker and self.state:
            state = self._tracking_state(pid)
            fds, flags = self.tracker.own_traces(state)
            return fds | self._inherited_traces(pid, state), flags
        if self.recorded is None or self.recorded.tracker not in TRACKERS:
            return set(), set()
        earlier = TRACKERS[self.recorded.tracker]()  # (only reads what it left)
        state = self._tracking_state(pid, self.recorded)
        fds, flags = earlier.own_traces(state)
        return fds | earlier.inherited_traces(pid, state, self.recorded.extra), flags

    def _inherited_traces(self, pid: int, state: dict) -> set[int]:
        """Once per pass and process: the records hide them, tracking closes them."""
        assert self.tracker is not None and self.state is not None
        if pid not in self.inherited:
            self.inherited[pid] = self.tracker.inherited_traces(pid, state, self.state.extra)
        return self.inherited[pid]

    def _track(
        self,
        tree: FrozenTree,
        vmas: dict[int, list[Vma]],
        frozen: bool,
        prepared: Callable[[], None] | None = None,
    ) -> dict[int, dict[int, VmaPages]]:
        """Present and dirty pages of every private VMA; resets tracking.
        `prepared`: called once what takes the targets' mmap locks for writing is
        done, before the scans, which only read (if the tracker's do)."""
        tracker = self.tracker or FullTracker()
        fresh: dict[str, dict] = {}  # the processes this pass gave tracking to
        try:
            pages = self._attach(tracker, tree, vmas, frozen, fresh)
        except BaseException:
            if fresh and not frozen:
                self._untrack_fresh(fresh)
            raise
        private = {pid: _private(vmas[pid]) for pid in tree.pids}
        if prepared and tracker.scan_only_reads:
            prepared()
        for pid in tree.pids:
            if pid in pages:
                continue  # vanished
            try:
                pages[pid] = tracker.scan(pid, private[pid], self._incremental_for(pid))
            except (TargetError, OSError, KeyError):
                # KeyError: no tracking was attached to a process that vanished
                if not self._vanished(pid):
                    raise
                pages[pid] = {v.start: VmaPages([], None) for v in private[pid]}
        return {pid: pages[pid] for pid in tree.pids}

    def _attach(
        self,
        tracker: Tracker,
        tree: FrozenTree,
        vmas: dict[int, list[Vma]],
        frozen: bool,
        fresh: dict[str, dict],
    ) -> dict[int, dict[int, VmaPages]]:
        """Tracking set up (attach) and registered (prepare) in every process; the
        pages of those that vanished meanwhile. `fresh` gets the state of each
        process this pass gave tracking to for the first time."""
        if self.tracker and self.state:
            # From here on, dirty information is being thrown away: until this
            # dump commits, nothing may build on the parent's tracking state.
            self.state.pending = self.dump_id
            trackstate.save(self.state)
            saved = asdict(self.state)
            per_pid = self.state.extra
            try:
                for pid in tree.pids:
                    state = self._tracking_state(pid)
                    try:
                        if self._incremental_for(pid) and (why := tracker.lost(pid, state)):
                            self.full_pids[pid] = f"tracking was lost ({why})"
                        stopper = _stopper(pid, frozen)
                        inherited = self._inherited_traces(pid, state)
                        before = state
                        state = tracker.attach(pid, state, stopper)
                        per_pid[str(pid)] = {**state, "start_time": self.start_times.get(pid)}
                        if tracker.own_traces(state)[0] - tracker.own_traces(before)[0]:
                            fresh[str(pid)] = per_pid[str(pid)]
                        tracker.drop_inherited(pid, inherited, stopper)
                    except (TargetError, OSError):
                        # (an exiting process's mm answers ioctls and injected
                        # syscalls with errors such as ENOMEM)
                        if not self._vanished(pid):
                            raise
            finally:
                # What attach put into the targets is kept even if this pass fails
                # (still pending: the next pass is full), or the next pass would put
                # a second one beside it. (Only if attach changed anything: soft-dirty
                # puts nothing there, and a write costs the window a file replace.)
                if asdict(self.state) != saved:
                    trackstate.save(self.state)
        private = {pid: _private(vmas[pid]) for pid in tree.pids}
        pages: dict[int, dict[int, VmaPages]] = {}
        for pid in tree.pids:
            try:
                self._prepare(tracker, pid, vmas[pid], frozen)
            except (TargetError, OSError, KeyError):
                if not self._vanished(pid):
                    raise
                pages[pid] = {v.start: VmaPages([], None) for v in private[pid]}
        return pages

    def _untrack_fresh(self, fresh: dict[str, dict]) -> None:
        """A pass that fails while setting tracking up takes it out of the processes
        it gave it to first: refused (a member it cannot seize, a tracer attached
        since the check), it leaves the tree as it found it. Tracking of earlier
        passes stays, pending: the next pass does not put a second one beside it."""
        assert self.state is not None
        try:
            remove_traces(replace(self.state, extra=fresh))
        except (TargetError, OSError) as err:
            log.error("could not take out the tracking this pass set up: %s", err)
            return  # it stays recorded: the next pass finds and reuses it
        for key in fresh:
            self.state.extra.pop(key, None)
        if self.state.extra:
            trackstate.save(self.state)
        else:
            trackstate.forget(self.state.pid)

    def _prepare(self, tracker: Tracker, pid: int, vmas: list[Vma], frozen: bool) -> None:
        """The tracker's registrations, with the VMAs of the instant: a range read
        while the process ran may cut into a region it mapped since, and the kernel
        would split that region in two. A running process is stopped for it, and
        only when there is something to register."""
        if frozen:
            tracker.prepare(pid, _private(vmas))
            return
        if not tracker.needs_stop(pid, _private(vmas)):
            return
        started = time.monotonic()
        with ProcessFreezer(pid):
            tracker.prepare(pid, _private(collect.read_vmas_listed(pid, vmas)))
        stopped_us = _us_since(started)
        self.times["frozen_time"] += stopped_us
        log.debug("process %d stopped %d us for its tracker's registrations", pid, stopped_us)

    def _snapshots(self, freeze: bool) -> bool:
        """A copy-on-write snapshot shortens the window of a dump that lets the tree
        run on. (A freezing pre-dump already thaws before its copy: a snapshot would
        only add the clone to its window.)"""
        req = self.req
        return freeze and req.snapshot and req.kind == "dump" and req.thaw is Thaw.RUNNING

    def _copy(
        self, writer: DumpWriter, tree: FrozenTree, vmas: dict, pages: dict, snap=None,
        files: list | None = None,
    ) -> dict:  # fmt: skip
        # The full tracker compares pages with the parent's content.
        compare = self.parent is not None and bool(self.tracker and self.tracker.compares_content)
        stats = memdump.copy_memory(
            writer,
            vmas,
            pages,
            self._parents_held(tree),
            self.parent,
            compare=compare,
            whole_files=self.contents,
            progress=self.req.progress,
            partial_ok=self.req.kind == "pre-dump",
            readers=snap.readers() if snap else None,
            same_as=self._same_as(tree, snap),
            shared=snap.shared_plans if snap else None,
            files_copied=files,
        )
        return {
            **stats,
            "tracker": self._tracker_name(),
            "iteration": self.req.iteration,
            "snapshot": snap.kind if snap else "none",
            "snapshot_time": snap.take_us if snap else 0,
        }

    def _same_as(self, tree: FrozenTree, snap) -> dict[int, int]:
        """pid -> its parent in the tree, when the copy reads the tree frozen (a
        final dump without a snapshot): then the page frames a child shares with
        its parent are the same bytes at the instant the copy reads."""
        if snap is not None or not self.frozen or self.req.kind != "dump":
            return {}
        return parents_in(tree.pids)

    def _parents_held(self, tree: FrozenTree) -> dict[int, list[Range]]:
        return {pid: self._parent_held(pid) for pid in tree.pids}

    def _parent_held(self, pid: int) -> list[Range]:
        """What the parent chain holds for this very process (nothing for a new one)."""
        if self.parent is None or pid in self.full_pids:
            return []
        return self.parent.held_ranges(f"pid-{pid}")

    # -- after the images are safe ---------------------------------------------

    def _inventory(self, tree: FrozenTree, start_time: int) -> dict:
        # As read before the scan (_identify): a PID reused since then must not
        # be taken for the process whose pages this dump holds.
        start_times = {str(pid): t for pid, t in self.start_times.items() if t >= 0}
        start_times[str(self.req.pid)] = start_time
        return {
            "tracker": self._tracker_name(),
            "kernel": platform.release(),
            "root_pid": self.req.pid,
            "pids": tree.pids,
            "start_times": start_times,
            "tracking": {
                "dump_id": self.dump_id,
                "incremental": self.incremental,
                "full_pass_reason": self.full_pass_reason,
                "per_pid": self.state.extra if self.state else {},
            },
            "usable_as_parent": True,
            "shell_job": self.req.shell_job,
        }

    def _remember_reset(self) -> None:
        if self.req.thaw is Thaw.KILL:
            trackstate.forget(self.req.pid)
        elif self.tracker and self.state:
            self.state.reset_by = self.dump_id
            self.state.pending = None
            trackstate.save(self.state)

    def _tracker_name(self) -> str:
        return self.tracker.name if self.tracker else "none"


def _private(vmas: list[Vma]) -> list[Vma]:
    return [v for v in vmas if v.policy is Policy.PRIVATE]


def _stopper(pid: int, frozen: bool):
    """How a tracker gets a stopped thread of pid: the frozen main thread, or one
    stopped briefly for it."""
    return (lambda: contextlib.nullcontext(pid)) if frozen else (lambda: stopped_thread(pid))


def _vmas_or_none(pid: int) -> list[Vma] | None:
    try:
        return collect.read_vmas(pid)
    except TargetError:
        return None  # exited meanwhile: the frozen pass finds out


def _locked(pid: int) -> str | None:
    """The process's locked memory (VmLck), as /proc says it."""
    try:
        return proc.read_status(pid).get("VmLck")
    except TargetError:
        return None


def _us_since(t: float) -> int:
    return int((time.monotonic() - t) * 1e6)


def _refuse_own_tree(root: int) -> None:
    """This tool in the tree (`pre-dump -t $$` from its shell) cannot stop itself,
    and a pass would find that out only after it stopped or tracked the rest."""
    if os.getpid() in descendants(root):
        raise TargetError(
            f"the tree of {root} includes checkpointer itself (PID {os.getpid()}): "
            "run it from outside the tree"
        )


def _check_seizable(tree: FrozenTree) -> None:
    """Every member of a tree that runs can be seized: not traced by another tool,
    ours to trace."""
    for pid in tree.pids:
        ptrace.check_seizable(pid, tree.threads[pid])
