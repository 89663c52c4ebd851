"""Tracking writes with userfaultfd write-protect, for kernels without soft-dirty.

A userfaultfd is created inside the target (one injected syscall while one
thread is stopped for about a millisecond) and its VMAs are registered in
async write-protect mode from here through a pidfd_getfd copy. A write then
only clears the page's protection, which PAGEMAP_SCAN reports as WRITTEN; a
scan with PM_SCAN_WP_MATCHING reports and re-protects atomically per page, so a
pre-dump copies while the target runs (it stops a process only to register VMAs
it mapped since the last pass, below). Tracking lives as long as the target keeps its
copy of the fd, across separate runs of the tool.

New VMAs (mmap, brk growth, mremap moves) are not registered: they are found
on every scan by the missing "uw" VmFlag, registered, and dumped whole. A lost
registration (the target closed the fd) forces a full pass.

A registration (or unregistration) splits every VMA its range cuts into, and
mremap refuses to move a range that spans two VMAs (EFAULT). So ranges are only
ever registered as the process's VMAs are at that instant: read while it is
frozen, or stopped for just that (needs_stop). A range read while it ran may by
then cut into a region the program mapped since.
"""

from __future__ import annotations

import logging
import os

from checkpointer.errors import TargetError
from checkpointer.kernel import kcmp, pagemap, proc, uffd
from checkpointer.pageruns import Range, clip, normalize
from checkpointer.trackers.base import StopThread, Tracker, VmaPages
from checkpointer.vmas import Vma

log = logging.getLogger("checkpointer")


class UffdWpTracker(Tracker):
    name = "uffd-wp"
    freezes_pre_dump = False
    stops_running = True
    scan_only_reads = True

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}  # pid -> our copy of the target's uffd
        # pid -> (vma start, end) -> (it was not registered yet, our registration
        # holds it), as prepare() found them
        self._registered: dict[int, dict[tuple[int, int], tuple[bool, bool]]] = {}
        # pid -> does it hold a userfaultfd of its own (inherited_traces)
        self._foreign: dict[int, bool] = {}

    def attach(self, pid: int, state: dict, stop: StopThread) -> dict:
        target_fd = state.get("uffd_fd")
        if target_fd is None or not uffd.is_target_uffd(pid, target_fd):
            high = _high_fd(pid)
            with stop() as tid:
                target_fd = uffd.open_target_uffd(pid, tid, high_fd=high)
            fd = uffd.get_fd(pid, target_fd)
            uffd.uffd_api(fd, uffd.WP_FEATURES)
        else:
            fd = uffd.get_fd(pid, target_fd)
        self._fds[pid] = fd
        return {"uffd_fd": target_fd}

    def own_traces(self, state: dict) -> tuple[set[int], set[str]]:
        target_fd = state.get("uffd_fd")
        return ({target_fd}, {"uw"}) if target_fd is not None else (set(), set())

    def inherited_traces(self, pid: int, state: dict, states: dict[str, dict]) -> set[int]:
        """A child forked from a tracked process holds its userfaultfd: useless to
        the child (a userfaultfd serves the memory it was made for), and the
        tool's, not the program's. kcmp tells it from a uffd of the program."""
        try:
            candidates = [fd for fd in uffd.target_uffds(pid) if fd != state.get("uffd_fd")]
        except TargetError:
            return set()  # it exited: it holds nothing (the pass sees it gone elsewhere)
        out: set[int] = set()
        for other, state in states.items():
            other_fd = state.get("uffd_fd")
            if other_fd is None or int(other) == pid:
                continue
            for fd in candidates:
                try:
                    if kcmp.same_open_file(int(other), other_fd, pid, fd):
                        out.add(fd)
                except OSError:
                    pass  # that process is gone, or its fd closed
        # The rest are the program's own: read here, where the fds are listed anyway.
        self._foreign[pid] = bool(set(candidates) - out)
        return out

    def drop_inherited(self, pid: int, fds: set[int], stop: StopThread) -> None:
        if fds:
            with stop() as tid:
                for fd in sorted(fds):
                    uffd.close_target_fd(pid, tid, fd)

    def lost(self, pid: int, state: dict) -> str | None:
        target_fd = state.get("uffd_fd")
        if target_fd is None:
            return "no userfaultfd was set up"
        if not uffd.is_target_uffd(pid, target_fd):
            return f"the target closed its userfaultfd (fd {target_fd})"
        return None

    def needs_stop(self, pid: int, vmas: list[Vma]) -> bool:
        """A running process is stopped to register the VMAs it mapped since the
        last pass, and on every pass while it holds a userfaultfd of its own: only
        registering again tells the tool's registrations from the program's."""
        if self._foreign.get(pid, True):
            return True
        return any(_to_register(vma) for vma in vmas)

    def prepare(self, pid: int, vmas: list[Vma]) -> None:
        """Register the VMAs not registered yet. Without a userfaultfd of the
        program's own, a registered VMA ("uw") can only be the tool's (the last
        close of a userfaultfd unregisters its VMAs). With one, every VMA is
        registered again, which the tool's uffd accepts and another's refuses
        (EBUSY)."""
        foreign = self._foreign.get(pid, True)
        fd = self._fds[pid]
        registered = self._registered[pid] = {}
        for vma in vmas:
            known = uffd.vma_is_wp_registered(vma.vmflags)
            ours = (known and not foreign) or uffd.register_wp(fd, vma.start, vma.size)
            registered[(vma.start, vma.end)] = (not known, ours)

    def scan(self, pid: int, vmas: list[Vma], incremental: bool) -> dict[int, VmaPages]:
        registered = self._registered.pop(pid, {})
        foreign = self._foreign.get(pid, True)
        result = {}
        with pagemap.Pagemap(pid) as pm:
            for vma in vmas:
                new, ours = registered.get((vma.start, vma.end)) or (
                    # Not registered by this pass: as it was, or changed since the
                    # list was read (then the walk below refuses a range that is
                    # not all registered, and it is copied whole).
                    False,
                    uffd.vma_is_wp_registered(vma.vmflags) and not foreign,
                )
                if new and ours:
                    pm.written_and_protect(vma.start, vma.end)  # start clean
                    # Read after the protect: a page first touched before it is
                    # reported by nothing else, ever.
                    present = pm.data_runs(vma.start, vma.end, vma.anonymous)
                    result[vma.start] = VmaPages(present, None)
                    continue
                read = self._read_and_reset(pm, vma) if ours else None
                if read is None:
                    log.info(
                        "process %d: %x-%x is not tracked by the tool's userfaultfd "
                        "(the program's own, or it changed during the pass): copied whole",
                        pid,
                        vma.start,
                        vma.end,
                    )
                    present = pm.data_runs(vma.start, vma.end, vma.anonymous)
                    result[vma.start] = VmaPages(present, None)  # copied whole
                    continue
                present, written = read
                if present is None:  # swapped pages: read the slow way
                    # (after the reset: a page populated in between is reported
                    # by the next pass, as written, and copied then too)
                    present = pm.data_runs(vma.start, vma.end, vma.anonymous)
                    present = normalize(present + written)
                dirty: list[Range] | None = clip(written, vma.start, vma.end)
                result[vma.start] = VmaPages(present, dirty if incremental else None)
        return result

    def _read_and_reset(
        self, pm: pagemap.Pagemap, vma: Vma
    ) -> tuple[list[Range] | None, list[Range]] | None:
        """(present, written) of a VMA write-protected by the tool, read and its
        written pages protected again in one walk (each page at one instant); None
        if the registration is not the tool's. The "uw" flag and the wp bits look
        the same when the target uses userfaultfd itself, but its own (un)protecting
        says nothing about writes since our last pass. Ours accepts our fd again
        (prepare: another uffd's gives EBUSY) and is asynchronous (the walk checks
        that first, and refuses before protecting anything); anything else is never
        trusted."""
        try:
            return pm.data_and_written_protect(vma.start, vma.end, vma.anonymous)
        except PermissionError:
            return None

    def untrack(self, pid: int, state: dict, stop: StopThread) -> None:
        """(Every thread of pid stopped: the ranges are the VMAs of the instant.)"""
        target_fd = state.get("uffd_fd")
        if target_fd is None or not uffd.is_target_uffd(pid, target_fd):
            return
        fd = uffd.get_fd(pid, target_fd)
        try:
            for start, end, flags in proc.read_smaps_vmas(pid):
                if uffd.vma_is_wp_registered(flags):
                    uffd.unregister(fd, start, end - start)
        finally:
            os.close(fd)
        with stop() as tid:
            uffd.close_target_fd(pid, tid, target_fd)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def _to_register(vma: Vma) -> bool:
    """Not registered yet, and registrable: a sealed VMA (mseal) refuses it."""
    return not uffd.vma_is_wp_registered(vma.vmflags) and "sl" not in vma.vmflags


def _high_fd(pid: int) -> int:
    """Where the injected fd goes: far above the low numbers a program reuses (a
    daemon closing and reopening 0-2 would get the lowest free one), yet under
    its RLIMIT_NOFILE, and not so high that its fd table grows much."""
    soft = proc.read_rlimits(pid).get("nofile", [1024])[0]
    return max(3, min(soft if soft > 0 else 2048, 2048) // 2)


def ensure_supported() -> None:
    from checkpointer.kernel import features

    ok, why = features.probe_uffd_wp_async()
    if not ok:
        raise TargetError(f"uffd-wp tracking is not available: {why}")
