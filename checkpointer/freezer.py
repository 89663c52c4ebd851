"""Stop every thread of a process tree with ptrace, and always let it go again.

Tasks are taken with PTRACE_SEIZE + PTRACE_INTERRUPT, which, unlike
PTRACE_ATTACH, sends no SIGSTOP and leaves the tree's job-control state alone.
Threads and children created while we freeze are caught by rescanning until two
rounds agree (a stopped task cannot create new ones); a tree that keeps changing
for MAX_ROUNDS rounds is an error, as in CRIU.

Thawing restores the state found: a task that was stopped by SIGSTOP before we
came stays stopped. Every path out detaches, so the target is never left stopped
because the tool failed; if the tool itself is killed, the kernel detaches. A tree
to kill is killed while still traced and reaped by its tracer, as in CRIU, so its
parent sees nothing but the kill.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkpointer.errors import TargetError
from checkpointer.kernel import proc, ptrace, taskctl
from checkpointer.kernel.inject import SyscallSession

log = logging.getLogger(__name__)

MAX_ROUNDS = 5
SIG_IGN = 1
RELEASE_TIMEOUT = 5.0  # seconds for the tracees a thaw could not detach at once
# A task may report signal-delivery-stops before the interrupt lands; each one is
# delivered and we wait again, a bounded number of times.
MAX_SIGNAL_STOPS = 16


class Thaw(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"  # left in a group-stop that `kill -CONT` ends
    KILL = "kill"


@dataclass
class FrozenTree:
    """Who is frozen: process id -> its thread ids, in tree order (root first)."""

    root: int
    threads: dict[int, list[int]] = field(default_factory=dict)
    was_stopped: set[int] = field(default_factory=set)  # pids group-stopped before us
    zombies: list[int] = field(default_factory=list)
    freezing_time_us: int = 0

    @property
    def pids(self) -> list[int]:
        return list(self.threads)


class Freezer:
    """Context manager: freeze on enter; on exit thaw as asked (RUNNING on error)."""

    def __init__(self, root: int, thaw: Thaw = Thaw.RUNNING, cgroup: str | None = None):
        self.root = root
        self.thaw_mode = thaw
        self.cgroup = Path(cgroup) if cgroup else None
        self.tree = FrozenTree(root)
        self._seized: list[int] = []
        self._cgroup_frozen = False
        self._refreeze_cgroup = False  # frozen before we froze it
        self._stopped_by_us: list[int] = []
        self._pinned: list[int] = []  # processes whose proc.task_dir is pinned

    def __enter__(self) -> FrozenTree:
        try:
            return self.freeze()
        except BaseException:
            self.thaw(Thaw.RUNNING)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self.thaw(Thaw.RUNNING if exc_type else self.thaw_mode)

    # -- freezing ------------------------------------------------------------

    def freeze(self) -> FrozenTree:
        started = time.monotonic()
        if not proc.exists(self.root):
            raise TargetError(f"process {self.root} does not exist")
        if self.cgroup:
            self._freeze_cgroup()
        stable = False
        for _ in range(MAX_ROUNDS):
            found = self._scan()
            new = [
                (pid, tid) for pid, tids in found.items() for tid in tids if tid not in self._seized
            ]
            if not new and found.keys() == self.tree.threads.keys():
                stable = True
                break
            for pid, tid in new:
                self._seize(pid, tid)
            self.tree.threads = {
                pid: [t for t in tids if t in self._seized] for pid, tids in found.items()
            }
            self.tree.threads = {pid: tids for pid, tids in self.tree.threads.items() if tids}
        if not stable:
            raise TargetError(
                f"process tree of {self.root} keeps changing after {MAX_ROUNDS} rounds"
            )
        if self.root not in self.tree.threads:
            raise TargetError(f"process {self.root} exited during the freeze")
        if self._cgroup_frozen:
            # Every task is in a ptrace stop now; the cgroup freeze has done its job.
            self._thaw_cgroup()
        self._pinned = list(self.tree.threads)  # unpinned by thaw, even if this fails
        proc.pin_task_dirs(self._pinned)
        self.tree.freezing_time_us = int((time.monotonic() - started) * 1e6)
        return self.tree

    def _scan(self) -> dict[int, list[int]]:
        """The tree now: every live process below root (or in the cgroup), its threads."""
        pids = self._cgroup_pids() if self.cgroup else self._descendants()
        found: dict[int, list[int]] = {}
        for pid in pids:
            try:
                if proc.wait_exited(pid, timeout=0):
                    if pid not in self.tree.zombies:
                        self.tree.zombies.append(pid)
                    continue
                # Not a main thread that called pthread_exit: it cannot be
                # stopped, and the process lives on in its other threads.
                found[pid] = [
                    t for t in proc.list_threads(pid) if not proc.wait_exited(pid, t, timeout=0)
                ]
            except TargetError:
                continue  # exited while we looked
        return found

    def _descendants(self) -> list[int]:
        return descendants(self.root)

    def _seize(self, pid: int, tid: int) -> None:
        try:
            ptrace.seize(tid)
        except TargetError:
            if proc.wait_exited(pid, tid):
                return  # the task ended between the scan and the seize
            raise
        self._seized.append(tid)
        ptrace.interrupt(tid)
        for _ in range(MAX_SIGNAL_STOPS):
            stop = ptrace.wait_stop(tid)
            if stop.kind in ("exited", "killed"):
                self._seized.remove(tid)
                return
            if stop.kind == "group-stop":
                self.tree.was_stopped.add(pid)
                return
            if stop.kind == "event-stop":
                return
            # A signal arrived first: let the task have it; the interrupt is
            # still pending and lands on the next stop.
            ptrace.cont(tid, stop.sig)
        raise TargetError(f"thread {tid} of {pid} keeps receiving signals; cannot stop it")

    # -- thawing ---------------------------------------------------------------

    def thaw(self, mode: Thaw) -> None:
        """Let every seized task go; safe to call twice. A tree to kill is killed
        while still traced (_kill_traced). A cgroup that was frozen before the dump
        froze it is frozen again once the tasks are let go."""
        try:
            self._thaw(mode)
        finally:
            if self._refreeze_cgroup:
                self._refreeze_cgroup = False
                assert self.cgroup
                (self.cgroup / "cgroup.freeze").write_text("1")

    def _thaw(self, mode: Thaw) -> None:
        proc.unpin_task_dirs(self._pinned)
        self._pinned = []
        if not self._seized and not self._cgroup_frozen:
            return  # thawed already: a second call must not signal anyone
        pids = list(self.tree.threads) or [self.root]
        if self._cgroup_frozen:
            self._thaw_cgroup()  # only on a failed freeze: the tasks are traced, or gone
        if mode is Thaw.KILL:
            self._kill_traced(pids)
            return
        masks: dict[int, int] = {}
        if mode is Thaw.STOPPED:
            self._stopped_by_us = [p for p in pids if p not in self.tree.was_stopped]
            # A pending SIGSTOP is delivered as soon as the task runs again, which
            # puts the whole thread group into an ordinary group-stop. Every other
            # signal is held meanwhile (ptrace.give_back_masks_in_group_stop): a
            # pending SIGCHLD would be handled first, on a stack the dump read.
            for tid in self._seized:
                if self._pid_of(tid) not in self.tree.was_stopped:
                    try:
                        masks[tid] = ptrace.get_sigmask(tid)
                        ptrace.set_sigmask(tid, ptrace.HOLD_ALL)
                    except TargetError:
                        masks.pop(tid, None)
            for pid in pids:
                if pid not in self.tree.was_stopped:
                    _signal(pid, signal.SIGSTOP)
        with _signals_deferred():
            stuck = self._release(self._seized)
            self._seized.clear()
        if masks:
            ptrace.give_back_masks_in_group_stop(masks)
        if stuck:
            raise TargetError(
                f"could not release thread(s) {', '.join(map(str, stuck))} of {self.root}: "
                "they stay traced by this process until it exits"
            )

    def _kill_traced(self, pids: list[int]) -> None:
        """SIGKILL the tree while every thread is still in its ptrace stop, and reap
        each thread as its tracer, as CRIU does: its parent then sees one change,
        the kill. (Stopping the tree to kill it after the detach showed the parent
        a stop first: su, sudo and runuser copy it onto themselves and never reap.)
        The deepest processes go first, each level once the one below is reaped, so
        that parents in the tree, made to reap as their children die
        (_let_parents_reap), are still there to do it: none is left to init."""
        parents = parents_in(pids + self.tree.zombies)
        if parents and self._seized:
            self._let_parents_reap(parents)
        stuck: list[int] = []
        with _signals_deferred():
            for level in deepest_first(pids, parents):
                for pid in level:
                    _signal(pid, signal.SIGKILL)
                stuck += _reap_traced([t for t in self._seized if self._pid_of(t) in level])
            self._seized.clear()
        for pid in pids:
            _reap_if_child(pid)  # a zombie leader we did not trace, if it is ours
        if stuck:
            raise TargetError(
                f"thread(s) {', '.join(map(str, stuck))} of {self.root} did not die within "
                f"{RELEASE_TIMEOUT:g} s of SIGKILL: they stay traced by this process until "
                "it exits"
            )

    def _let_parents_reap(self, parents: dict[int, int]) -> None:
        """Before a kill, each parent in the tree (seized) is made to reap its
        children as they die (see reap_as_they_die)."""
        for parent in sorted(set(parents.values())):
            zombies = [z for z in self.tree.zombies if parents.get(z) == parent]
            try:
                with SyscallSession(proc.live_tid(parent)) as s:
                    reap_as_they_die(s, zombies)
            except (TargetError, OSError) as exc:
                log.debug("process %d keeps its SIGCHLD action: %s", parent, exc)

    def _release(self, tids: list[int]) -> list[int]:
        """Detach every tid; the ones still traced are returned. PTRACE_DETACH needs
        a ptrace-stop: a tracee that runs again (continued to take a signal, or
        woken by a SIGKILL from elsewhere before it shows as exiting) refuses with
        ESRCH, which is not "gone". Those are interrupted and then polled all
        together until each stops (detached then) or shows as dying: a dying group
        leader reports its exit only after its other threads were reaped (by us,
        if we still trace them), so waiting on one tid at a time, or for its exit
        report, sat out the whole timeout."""
        pending = []
        for tid in tids:
            try:
                ptrace.detach(tid)
            except TargetError:
                if not proc.wait_exited(self._pid_of(tid), tid, timeout=0):
                    pending.append(tid)
        for tid in pending:
            try:
                ptrace.interrupt(tid)
            except TargetError:
                pass  # exiting meanwhile: its exit is polled below
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while pending and time.monotonic() < deadline:
            for tid in list(pending):
                try:
                    stop = ptrace.poll_stop(tid)
                    if stop is not None and stop.kind not in ("exited", "killed"):
                        ptrace.detach(tid, stop.sig if stop.kind == "signal-stop" else 0)
                except TargetError:
                    stop = None
                if stop is None and not proc.wait_exited(self._pid_of(tid), tid, timeout=0):
                    continue  # neither stopped nor dying: poll again
                pending.remove(tid)
            time.sleep(0.001)
        return [t for t in pending if not proc.wait_exited(self._pid_of(t), t, timeout=0.2)]

    def _pid_of(self, tid: int) -> int:
        for pid, tids in self.tree.threads.items():
            if tid in tids:
                return pid
        return tid

    def undo_stop(self) -> None:
        """Resume the tasks a STOPPED thaw stopped (the dump failed after all)."""
        for pid in self._stopped_by_us:
            _signal(pid, signal.SIGCONT)
        self._stopped_by_us = []

    # -- cgroup v2 freezer ----------------------------------------------------

    def _freeze_cgroup(self) -> None:
        assert self.cgroup
        control = self.cgroup / "cgroup.freeze"
        if not control.exists():
            raise TargetError(f"{self.cgroup} is not a cgroup v2 directory with cgroup.freeze")
        # Frozen by someone else already (an admin): it stays so after the dump.
        self._refreeze_cgroup = control.read_text().strip() == "1"
        control.write_text("1")
        self._cgroup_frozen = True
        deadline = time.monotonic() + 10
        while "frozen 1" not in (self.cgroup / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise TargetError(f"cgroup {self.cgroup} did not freeze within 10 s")
            time.sleep(0.005)

    def _thaw_cgroup(self) -> None:
        assert self.cgroup
        (self.cgroup / "cgroup.freeze").write_text("0")
        self._cgroup_frozen = False

    def _cgroup_pids(self) -> list[int]:
        assert self.cgroup
        pids = [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]
        if self.root not in pids:
            raise TargetError(f"process {self.root} is not in cgroup {self.cgroup}")
        # The root first, as in a tree walk; the rest in pid order.
        return sorted(pids, key=lambda p: (p != self.root, p))


class ProcessFreezer(Freezer):
    """Stops every thread of one process, not its children: long enough to change
    its memory map's kernel state with nothing of it moving."""

    def _descendants(self) -> list[int]:
        return [self.root]


def descendants(root: int) -> list[int]:
    """root and every process below it, parents first (processes that exit while
    the walk runs are left out)."""
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        if pid in order:
            continue
        order.append(pid)
        try:
            queue.extend(proc.list_children(pid))
        except TargetError:
            continue
    return order


def live_tree(root: int) -> FrozenTree:
    """The tree as it is, without stopping it (pre-dumps that need no freeze)."""
    tree = FrozenTree(root)
    for pid in descendants(root):
        if pid != root and proc.tearing_down(pid):
            continue  # killed, its memory going away: nothing to read (a zombie is kept)
        try:
            tree.threads[pid] = proc.list_threads(pid)
        except TargetError:
            if pid == root:
                raise
    return tree


def parents_in(pids: list[int]) -> dict[int, int]:
    """pid -> its parent, for each process whose parent is one of pids."""
    inside = set(pids)
    parents = {}
    for pid in pids:
        try:
            ppid = proc.read_stat(pid).ppid
        except TargetError:
            continue
        if ppid in inside:
            parents[pid] = ppid
    return parents


def reap_as_they_die(s: SyscallSession, zombies: list[int]) -> None:
    """In a parent about to be killed, with its tree: ignore SIGCHLD, so the kernel
    reaps its children as they die (killed before it: deepest_first), and
    reap its zombies now. Otherwise they outlive it as zombies of init, and a
    restore on this host waits for their PIDs: a container's init can take
    seconds to reap them. Best effort: the tree dies either way."""
    taskctl.sigaction(s, signal.SIGCHLD, SIG_IGN, 0, 0, 0)
    for zombie in zombies:
        taskctl.reap(s, zombie)


def deepest_first(pids: list[int], parents: dict[int, int]) -> list[list[int]]:
    """pids grouped by their depth below the tree's top, the deepest group first."""
    depth: dict[int, int] = {}
    for pid in pids:
        d, up = 0, pid
        while up in parents and d <= len(pids):
            d, up = d + 1, parents[up]
        depth[pid] = d
    return [
        [pid for pid in pids if depth[pid] == level]
        for level in sorted(set(depth.values()), reverse=True)
    ]


def kill_children_first(pids: list[int], parents: dict[int, int], wait: float = 1.0) -> None:
    """SIGKILL every untraced process, the deepest first, each level once the one
    below it is gone: a child that dies before its parent is reaped by it (if it
    ignores SIGCHLD), one that dies after is left to init."""
    levels = deepest_first(pids, parents)
    for killed in levels:
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while killed is not levels[-1] and any(map(_dying, killed)) and time.monotonic() < deadline:
            time.sleep(0.001)


def _reap_traced(tids: list[int]) -> list[int]:
    """Wait, as their tracer, for killed threads to exit; the ones that did not
    within RELEASE_TIMEOUT are returned. A dying group leader reports its exit only
    once its other threads are reaped, so all are polled together. The tracer's
    wait hands a process's exit on to its parent."""
    pending = list(tids)
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while pending:
        for tid in list(pending):
            try:
                stop = ptrace.poll_stop(tid)
            except TargetError:
                pending.remove(tid)  # not ours to wait for any more: gone
                continue
            if stop is None:
                continue
            if stop.kind in ("exited", "killed"):
                pending.remove(tid)
            else:  # a stop reported before the kill: let it go on to its death
                with contextlib.suppress(TargetError):
                    ptrace.cont(tid)
        if pending:
            if time.monotonic() > deadline:
                break
            time.sleep(0.0005)
    return pending


def kill_stopped_tree(pids: list[int]) -> None:
    """Kill a tree that a dump left stopped (a migration's source, once the
    destination has its images), none of it left to init: each parent in it is
    stopped for an injected reap_as_they_die, then kill_children_first."""
    parents = parents_in(pids)
    for parent in sorted(set(parents.values())):
        try:
            with stopped_thread(parent) as tid, SyscallSession(tid) as s:
                reap_as_they_die(s, [])
        except (TargetError, OSError) as exc:
            log.debug("process %d keeps its SIGCHLD action: %s", parent, exc)
    kill_children_first(pids, parents)


def _dying(pid: int) -> bool:
    """Killed and not gone yet. A zombie is not waited for once its threads are
    gone (its parent does not ignore SIGCHLD after all: it is left to init); the
    main thread of a process whose other threads are still exiting already reads
    as one, and its parent reaps it only when the last has gone."""
    try:
        status = proc.read_status(pid)
    except TargetError:
        return False
    return not status.get("State", "Z").startswith("Z") or status.get("Threads", "1") != "1"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap_if_child(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class _signals_deferred:
    """Hold SIGINT/SIGTERM/SIGHUP while detaching, so a second ^C cannot cut it short."""

    def __enter__(self) -> None:
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, held)

    def __exit__(self, *exc) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


class stopped_thread:
    """Stop one live thread of pid (its main thread, if it has not exited) briefly,
    for an injected syscall."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> int:
        self._freezer = Freezer(self.pid)
        tid = proc.live_tid(self.pid)
        self._freezer._seize(self.pid, tid)
        if tid not in self._freezer._seized:
            raise TargetError(f"process {self.pid} exited")
        return tid

    def __exit__(self, *exc) -> None:
        self._freezer.thaw(Thaw.RUNNING)
