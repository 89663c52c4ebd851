"""Tracking writes with userfaultfd write-protect, for kernels without soft-dirty.

A userfaultfd is created inside the target (one injected syscall while one
thread is stopped for about a millisecond) and its VMAs are registered in
async write-protect mode from here through a pidfd_getfd copy. A write then
only clears the page's protection, which PAGEMAP_SCAN reports as WRITTEN; a
scan with PM_SCAN_WP_MATCHING reports and re-protects atomically per page, so a
pre-dump needs no freeze at all. Tracking lives as long as the target keeps its
copy of the fd, across separate runs of the tool.

New VMAs (mmap, brk growth, mremap moves) are not registered: they are found
on every scan by the missing "uw" VmFlag, registered, and dumped whole. A lost
registration (the target closed the fd) forces a full pass.
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
    scan_only_reads = True

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}  # pid -> our copy of the target's uffd
        # pid -> vma start -> (it was not registered yet, our registration holds it)
        self._registered: dict[int, dict[int, tuple[bool, bool]]] = {}

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

    def prepare(self, pid: int, vmas: list[Vma]) -> None:
        """Register every VMA: a new one for the first time, a registered one again,
        which our uffd accepts and another's refuses (EBUSY)."""
        self._registered[pid] = {vma.start: self._register(pid, vma) for vma in vmas}

    def _register(self, pid: int, vma: Vma) -> tuple[bool, bool]:
        new = not uffd.vma_is_wp_registered(vma.vmflags)
        return new, uffd.register_wp(self._fds[pid], vma.start, vma.end - vma.start)

    def scan(self, pid: int, vmas: list[Vma], incremental: bool) -> dict[int, VmaPages]:
        registered = self._registered.pop(pid, {})
        result = {}
        with pagemap.Pagemap(pid) as pm:
            for vma in vmas:
                new, ours = registered.get(vma.start) or self._register(pid, vma)
                if new:
                    if ours:
                        pm.written_and_protect(vma.start, vma.end)  # start clean
                    # Read after the protect: a page first touched before it is
                    # reported by nothing else, ever.
                    present = pm.data_runs(vma.start, vma.end, vma.anonymous)
                    result[vma.start] = VmaPages(present, None)
                    continue
                read = self._read_and_reset(pm, vma) if ours else None
                if read is None:
                    log.info(
                        "process %d: %x-%x is write-protected by its own userfaultfd: "
                        "copied whole on every pass",
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
        target_fd = state.get("uffd_fd")
        if target_fd is None or not uffd.is_target_uffd(pid, target_fd):
            return
        fd = uffd.get_fd(pid, target_fd)
        try:
            flags = proc.read_smaps_vmflags(pid)
            for m in proc.read_maps(pid):
                if uffd.vma_is_wp_registered(flags.get(m.start, [])):
                    uffd.unregister(fd, m.start, m.end - m.start)
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
