"""dump and pre-dump: freeze, collect, track, copy, write, thaw.

A final dump keeps the tree frozen from the first register read to the last
page written, so the images describe one instant. A pre-dump only needs the
dirty information to be read and reset at one instant (for soft-dirty, with the
tree frozen; for uffd-wp and full, not even that); the pages are copied while
the tree runs, because any page written after the reset is dirty next time.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from checkpointer import collect, snapshot, trackstate
from checkpointer.copier import PageCopier
from checkpointer.errors import TargetError
from checkpointer.freezer import Freezer, FrozenTree, Thaw
from checkpointer.images import FROZEN_LEVEL, PAGE_LEVEL, Dump, DumpWriter
from checkpointer.kernel import proc
from checkpointer.kernel.pagemap import PAGE_SIZE
from checkpointer.plan import ParentPages, private_plan, shared_plans
from checkpointer.progress import Progress
from checkpointer.trackers import FullTracker, Tracker, VmaPages, make_tracker
from checkpointer.vmas import Policy, Vma

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
    cgroup: str | None = None
    progress: bool | None = None  # None: only when stderr is a terminal
    iteration: int | None = None
    # zstd level of page data; None: fast for a frozen dump, smaller for a pre-dump
    compress_level: int | None = None
    # Thaw a leave-running dump as soon as a copy-on-write child of each process
    # holds its memory (snapshot.py), instead of after the copy.
    snapshot: bool = True

    def __post_init__(self) -> None:
        self.images_dir = Path(self.images_dir)

    @property
    def page_level(self) -> int:
        if self.compress_level is not None:
            return self.compress_level
        return FROZEN_LEVEL if self.kind == "dump" else PAGE_LEVEL


@dataclass
class DumpResult:
    path: Path
    stats: dict
    tracker: str
    incremental: bool
    full_pass_reason: str | None = None
    pids: list[int] = field(default_factory=list)


def pre_dump(req: DumpRequest) -> DumpResult:
    req.kind = "pre-dump"
    req.track_mem = True
    req.thaw = Thaw.RUNNING
    return run(req)


def dump(req: DumpRequest) -> DumpResult:
    req.kind = "dump"
    return run(req)


def run(req: DumpRequest) -> DumpResult:
    with trackstate.target_lock(req.pid):
        try:
            return _Pass(req).run()
        except (OSError, TargetError) as err:
            # A traced process killed mid-dump stays a zombie until we detach.
            if proc.wait_exited(req.pid, timeout=1.0):
                raise TargetError(
                    f"process {req.pid} exited during the {req.kind}; no image was written"
                ) from err
            raise


class _Pass:
    """One dump or pre-dump of one tree."""

    def __init__(self, req: DumpRequest) -> None:
        self.req = req
        self.dump_id = uuid.uuid4().hex
        self.parent: Dump | None = None
        self.parent_link: str | None = None
        self.tracker: Tracker | None = None
        self.incremental = False
        self.full_pass_reason: str | None = None
        self.state: trackstate.TrackState | None = None
        self.times: dict[str, int] = {"freezing_time": 0, "frozen_time": 0}

    # The order of this method is the algorithm.
    def run(self) -> DumpResult:
        req = self.req
        start_time = collect.start_time(req.pid)
        self._open_parent(start_time)
        self._choose_tracker(start_time)
        freeze = req.kind == "dump" or (self.tracker is not None and self.tracker.freezes_pre_dump)
        freezer = Freezer(req.pid, thaw=req.thaw, cgroup=req.cgroup)
        watchdog = snapshot.Watchdog() if self._snapshots(freeze) else None
        try:
            with DumpWriter(
                req.images_dir, kind=req.kind, parent=self.parent_link, level=req.page_level
            ) as writer:
                # The memory maps with their smaps flags, read while the tree still
                # runs; a frozen pass re-reads only the cheap maps file (collect.py).
                known = (
                    {pid: _vmas_or_none(pid) for pid in _live_tree(req.pid).pids} if freeze else {}
                )
                tree = self._freeze(freezer) if freeze else _live_tree(req.pid)
                frozen_at = time.monotonic()
                vmas = {pid: collect.read_vmas(pid, known.get(pid)) for pid in tree.pids}
                self._write_state(writer, tree, vmas)
                log.debug("state collected in %d us", _us_since(frozen_at))
                # Nothing to reset: the copy-on-write children can be scanned later.
                later = watchdog is not None and self.tracker is None
                pages = None if later else self._track(tree, vmas, frozen=freeze)
                log.debug("tracking read and reset at %d us", _us_since(frozen_at))
                snap = snapshot.take(tree, vmas, pages, watchdog) if watchdog else None
                if snap or (req.kind == "pre-dump" and freeze):
                    freezer.thaw(Thaw.RUNNING)  # dirty state is read and reset
                    self.times["frozen_time"] = _us_since(frozen_at)
                if pages is None:
                    pages = snap.scan(vmas) if snap else self._track(tree, vmas, frozen=freeze)
                try:
                    stats = self._copy(writer, tree, vmas, pages, snap)
                finally:
                    if snap:
                        snap.release()
                log.debug("pages copied at %d us", _us_since(frozen_at))
                if req.kind == "dump" and not snap:
                    if req.thaw is not Thaw.KILL:
                        # Every byte is read; fsync and rename need not keep the
                        # target waiting. (A tree to kill stays frozen until the
                        # images are safe.)
                        freezer.thaw(req.thaw)
                    self.times["frozen_time"] = _us_since(frozen_at)
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
        except BaseException:
            freezer.thaw(Thaw.RUNNING)
            freezer.undo_stop()  # if it was already thawed into a stop we asked for
            if self.tracker:
                self.tracker.close()
            raise
        self._remember_reset()
        freezer.thaw(req.thaw)
        if self.tracker:
            self.tracker.close()
        return DumpResult(
            req.images_dir,
            stats,
            self._tracker_name(),
            self.incremental,
            self.full_pass_reason,
            tree.pids,
        )

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

    def _choose_tracker(self, start_time: int) -> None:
        req = self.req
        if not (req.track_mem or self.parent):
            return  # a plain full dump: no tracking read or reset
        self.tracker = make_tracker(req.tracker)
        self.state = trackstate.load(req.pid, start_time)
        if self.state is None or self.state.tracker != self.tracker.name:
            self.state = trackstate.TrackState(req.pid, start_time, self.tracker.name)
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

    # -- while frozen -------------------------------------------------------

    def _write_state(self, writer: DumpWriter, tree: FrozenTree, vmas: dict) -> None:
        writer.write_pstree(collect.pstree_records(tree))
        for pid in tree.pids:
            # Registers and injected syscalls need every thread in a ptrace stop. The
            # sessions' scratch page is gone before the memory is tracked or copied.
            injected = (
                collect.read_injected_state(pid, tree.threads[pid])
                if self.req.kind == "dump"
                else None
            )
            writer.write_mm(
                pid, collect.mm_record(pid, injected), collect.vma_records(pid, vmas[pid])
            )
            if injected is not None:
                process, threads = collect.core_records(
                    pid, tree.threads[pid], pid in tree.was_stopped, injected
                )
                writer.write_core(pid, process, threads)
                writer.write_fds(pid, collect.fd_records(pid))

    def _track(
        self, tree: FrozenTree, vmas: dict[int, list[Vma]], frozen: bool
    ) -> dict[int, dict[int, VmaPages]]:
        """Present and dirty pages of every private VMA; resets tracking."""
        tracker = self.tracker or FullTracker()
        if self.tracker and self.state:
            # From here on, dirty information is being thrown away: until this
            # dump commits, nothing may build on the parent's tracking state.
            self.state.pending = self.dump_id
            trackstate.save(self.state)
            per_pid = self.state.extra
            for pid in tree.pids:
                per_pid[str(pid)] = tracker.attach(
                    pid, per_pid.get(str(pid), {}), pid if frozen else None
                )
        return {
            pid: tracker.scan(
                pid, [v for v in vmas[pid] if v.policy is Policy.PRIVATE], self.incremental
            )
            for pid in tree.pids
        }

    def _snapshots(self, freeze: bool) -> bool:
        """A copy-on-write snapshot shortens the window of a dump that lets the tree
        run on. (A freezing pre-dump already thaws before its copy: a snapshot would
        only add the clone to its window.)"""
        req = self.req
        return freeze and req.snapshot and req.kind == "dump" and req.thaw is Thaw.RUNNING

    def _copy(
        self, writer: DumpWriter, tree: FrozenTree, vmas: dict, pages: dict, snap=None
    ) -> dict:
        plans = {f"pid-{pid}": private_plan(pid, vmas[pid], pages[pid]) for pid in tree.pids}
        plans.update(shared_plans(vmas))
        segments = [seg for plan in plans.values() for seg in plan]
        scanned = sum(seg.end - seg.start for seg in segments)
        to_read = sum(seg.end - seg.start for seg in segments if seg.where == "data")
        progress = Progress(to_read // PAGE_SIZE, PAGE_SIZE, self.req.progress)
        copier = PageCopier(
            PAGE_SIZE,
            progress,
            partial_ok=self.req.kind == "pre-dump",
            readers=snap.readers() if snap else None,
        )
        counts = {
            "pages_written": 0,
            "pages_skipped_parent": 0,
            "pages_zero": 0,
            "bytes_raw": 0,
            "bytes_compressed": 0,
        }
        compare = (
            self.parent is not None and self.tracker is not None and (self.tracker.compares_content)
        )
        try:
            for owner, plan in plans.items():
                page_writer = writer.open_pages(owner)
                parent_reader = (
                    ParentPages(self.parent, owner)
                    if (compare and owner.startswith("pid-"))
                    else None
                )
                copier.copy(page_writer, plan, parent_reader)
                ps = page_writer.close()
                counts["pages_written"] += ps.written
                counts["pages_skipped_parent"] += ps.parent
                counts["pages_zero"] += ps.zero
                counts["bytes_raw"] += ps.bytes_raw
                counts["bytes_compressed"] += ps.bytes_compressed
        finally:
            copier.close()
            progress.finish()
        return {
            "memdump_time": copier.times.memdump_us,
            "memwrite_time": copier.times.memwrite_us,
            "pages_scanned": scanned // PAGE_SIZE,
            **counts,
            "tracker": self._tracker_name(),
            "iteration": self.req.iteration,
            "snapshot": "copy-on-write" if snap else "none",
            "snapshot_time": snap.take_us if snap else 0,
        }

    # -- after the images are safe ---------------------------------------------

    def _inventory(self, tree: FrozenTree, start_time: int) -> dict:
        start_times = {str(self.req.pid): start_time}
        for pid in tree.pids:
            try:
                start_times[str(pid)] = collect.start_time(pid)
            except TargetError:
                pass
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


def _live_tree(root: int) -> FrozenTree:
    """The tree as it is, without stopping it (pre-dumps that need no freeze)."""
    tree = FrozenTree(root)
    queue = [root]
    while queue:
        pid = queue.pop(0)
        if pid in tree.threads:
            continue
        try:
            tree.threads[pid] = proc.list_threads(pid)
            queue.extend(proc.list_children(pid))
        except TargetError:
            if pid == root:
                raise
    return tree


def _vmas_or_none(pid: int) -> list[Vma] | None:
    try:
        return collect.read_vmas(pid)
    except TargetError:
        return None  # exited meanwhile: the frozen pass finds out


def _us_since(t: float) -> int:
    return int((time.monotonic() - t) * 1e6)
