"""Live migration: pre-copy while the tree runs, one freeze, restore elsewhere.

The flow (the converge loop of converge.py, with every dump streamed as soon as
it is committed):

1. each pre-dump is written to a local staging chain and streamed to the
   destination, which commits it there and rebuilds its memory in a template
   process (restore/template.py), while the tree still runs;
2. when a stop rule holds, the final dump freezes the tree and leaves it stopped
   (SIGSTOP) on the source; it is streamed like the others;
3. the destination restores it, from the template: only the pages written since
   the last pre-dump are written in the downtime; it answers once the tree runs;
4. only then the source is killed (after the destination confirmed COMMIT).

Any failure before that lets the source go (SIGCONT: it keeps running) and the
destination undoes what it did (receive.py). When both ends share one PID
space (the same host), the restored tree needs the source's PIDs: the source is
killed before the restore, and a failed restore is rolled back by restoring the
local staging chain on the source.

With tcp_established, the final dump leaves the stopped source's established
connections in repair mode and locked (dump.py hold_connections): a rollback
releases them before SIGCONT; after a restore elsewhere they are released once the
source is killed; on one host the restore lifts the locks itself.

The staging chain is a first version: a dump is committed locally, then its files
are streamed, so the final dump's pages are written twice before the restore.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from checkpointer import interrupt
from checkpointer.converge import ConvergeOptions, Iteration, converge
from checkpointer.errors import CheckpointError
from checkpointer.fdstate.tree import RepairedConnections
from checkpointer.freezer import Thaw, kill_stopped_tree
from checkpointer.kernel import proc
from checkpointer.receive import COMMIT_TIMEOUT, can_restore, host_identity
from checkpointer.transport import Destination, Link, SshLink, TcpLink, parse_page_server

log = logging.getLogger("checkpointer")


@dataclass
class MigrateOptions:
    pid: int
    to: str | None = None  # [USER@]HOST for ssh
    page_server: str | None = None  # ADDRESS:PORT instead of ssh
    ssh_options: list[str] = field(default_factory=list)
    remote_command: str = "checkpointer"
    remote_dir: str | None = None  # default: a fresh directory under /var/tmp
    images_dir: Path | None = None  # local staging chain; default: a temp dir, removed
    same_pid_space: str = "auto"  # "yes" | "no": override what hello says
    leave_stopped: bool = False  # the restored tree waits for SIGCONT at the destination
    tcp_established: bool = False  # established TCP connections move along (repair mode)
    tracker: str = "auto"
    prepare: bool = True  # rebuild each pre-dump's memory at the destination (a template)
    max_iterations: int = 8
    min_pages: int = 64
    max_grow: float = 10.0
    max_downtime_ms: float = 300.0
    progress: bool | None = False


@dataclass
class StreamedIteration:
    number: int
    kind: str
    pages_written: int
    bytes_streamed: int
    stream_ms: float  # from the first byte sent to committed at the destination
    send_ms: float  # from the first byte sent to the last
    rate_mb_s: float  # bytes_streamed / send_ms
    frozen_ms: float
    duration_ms: float
    prepare_ms: float = 0.0  # the destination's template of this pre-dump (0: none)


@dataclass
class MigrateResult:
    destination: str
    remote_dir: str
    iterations: list[StreamedIteration] = field(default_factory=list)
    stop_rule: str = ""
    frozen_ms: float = 0.0  # the final dump's freeze
    downtime_ms: float = 0.0  # from the final dump's start to running at the destination
    restore_ms: float = 0.0
    restore_bytes_written: int = 0  # page data the restore wrote (less from a template)
    root_pid: int = 0
    pids: list[int] = field(default_factory=list)
    same_pid_space: bool = False
    bytes_streamed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


class MigrationFailed(CheckpointError):
    """The migration did not happen; the message says what became of the source,
    also when an interruption ended it (printed as it is, cli/common.py)."""

    tells_interruption = True


def migrate(
    opts: MigrateOptions, on_iteration: Callable[[StreamedIteration], None] | None = None
) -> MigrateResult:
    proc.require_process(opts.pid)  # before any connection
    link = _open_link(opts)
    staging = opts.images_dir or Path(
        tempfile.mkdtemp(prefix="checkpointer-migrate-", dir="/var/tmp")
    )
    try:
        return _Migration(opts, link, Path(staging), on_iteration).run()
    finally:
        link.close()
        if opts.images_dir is None:  # set when a rollback restored from it
            shutil.rmtree(staging, ignore_errors=True)


def _open_link(opts: MigrateOptions) -> Link:
    if opts.page_server:
        return TcpLink(*parse_page_server(opts.page_server))
    if not opts.to:
        raise CheckpointError("migrate needs --to [USER@]HOST or --page-server ADDRESS:PORT")
    remote_dir = opts.remote_dir or f"/var/tmp/checkpointer-migrate-{opts.pid}-{int(time.time())}"
    opts.remote_dir = remote_dir
    return SshLink(opts.to, remote_dir, opts.ssh_options, opts.remote_command)


class _Migration:
    def __init__(self, opts, link: Link, staging: Path, on_iteration) -> None:
        self.opts = opts
        self.staging = staging
        self.on_iteration = on_iteration
        self.dest = Destination(link)
        hello = self.dest.hello
        ours = host_identity()
        same = hello.get("boot_id") == ours["boot_id"] and hello.get("pid_ns") == ours["pid_ns"]
        if opts.same_pid_space != "auto":
            same = opts.same_pid_space == "yes"
        self.result = MigrateResult(
            link.description, hello.get("images_dir", ""), same_pid_space=same
        )
        self.final_started: float | None = None
        self.connections: RepairedConnections | None = None
        self.tree: list[int] = [opts.pid]
        self.source_killed = False

    def run(self) -> MigrateResult:
        opts, res = self.opts, self.result
        try:
            conv = converge(
                ConvergeOptions(
                    pid=opts.pid,
                    images_dir=self.staging,
                    tracker=opts.tracker,
                    max_iterations=opts.max_iterations,
                    min_pages=opts.min_pages,
                    max_grow=opts.max_grow,
                    max_downtime_ms=opts.max_downtime_ms,
                    thaw=Thaw.STOPPED,
                    tcp_established=opts.tcp_established,
                    hold_connections=True,
                    progress=opts.progress,
                ),
                self._stream,
            )
        except BaseException as err:
            self._let_source_go()
            raise self._failed("streaming the dumps", err) from None
        # The stopped source's connections stay in repair mode and locked: neither
        # its peers nor its own kernel may see them close or change until the
        # destination's restore takes them over (or the source runs on).
        self.connections = conv.connections
        res.stop_rule = conv.stop_rule
        res.frozen_ms = conv.downtime_ms
        if res.same_pid_space:
            try:
                self._check_restorable()
            except BaseException as err:
                self._let_source_go()
                raise self._failed("before the restore", err) from None
        try:
            if res.same_pid_space:
                self._kill_source()  # the restore needs its PIDs
                # In repair mode, the connections closed silently; their locks stay
                # for the restore (the destination's, or the rollback's here).
                self.connections = None
            restored = self.dest.restore("final", opts.leave_stopped)
            running_at = time.monotonic()
            self.dest.commit()
        except BaseException as err:
            if res.same_pid_space:
                raise self._restore_here(err) from None
            self._let_source_go()
            raise self._failed("restoring at the destination", err) from None
        if not res.same_pid_space:
            self._kill_source()
            if self.connections:  # closed silently; this host's locks are not needed
                self.connections.release()
        res.downtime_ms = (running_at - self.final_started) * 1000
        res.restore_ms = restored.get("seconds", 0.0) * 1000
        res.restore_bytes_written = restored.get("bytes_written", 0)
        res.root_pid, res.pids = restored["root_pid"], restored["pids"]
        try:
            self.dest.end()
        except CheckpointError as err:
            log.warning("the migration is done, but the session did not end cleanly: %s", err)
        return res

    def _stream(self, it: Iteration) -> None:
        if it.kind == "dump":
            self.final_started = time.monotonic() - it.duration_ms / 1000
            from checkpointer.images import Dump

            with Dump.open(str(self.staging / it.directory)) as d:
                self.tree = list(d.pids)
        answer = self.dest.send_dump(str(self.staging / it.directory))
        prepare_ms = 0.0
        if it.kind == "pre-dump" and self.opts.prepare and self.dest.hello.get("prepare"):
            # While the tree runs: the final restore then writes only newer pages.
            prepared = self.dest.prepare(answer["name"])
            if prepared.get("ok"):
                prepare_ms = prepared.get("seconds", 0.0) * 1000
            else:
                log.warning("the destination made no template: %s", prepared.get("message"))
        send_s = answer["send_seconds"]
        streamed = StreamedIteration(
            number=it.number,
            kind=it.kind,
            pages_written=it.pages_written,
            bytes_streamed=answer["bytes_streamed"],
            stream_ms=answer["seconds"] * 1000,
            send_ms=send_s * 1000,
            rate_mb_s=answer["bytes_streamed"] / send_s / 1e6 if send_s > 0 else 0.0,
            frozen_ms=it.frozen_ms,
            duration_ms=it.duration_ms,
            prepare_ms=prepare_ms,
        )
        self.result.iterations.append(streamed)
        self.result.bytes_streamed += streamed.bytes_streamed
        if self.on_iteration:
            self.on_iteration(streamed)

    def _check_restorable(self) -> None:
        """Same PID space: the source dies before the restore, so whatever can be
        known to fail must fail now, while the source can still resume."""
        if not (self.dest.hello.get("can_restore") and can_restore()):
            raise CheckpointError("one end cannot restore")
        from checkpointer.restore import images as restore_images

        images = restore_images.load(str(self.staging / "final"))
        # Taken PIDs and addresses are expected: the source holds them until it is killed.
        restore_images.preflight(images, source_alive=True)

    def _let_source_go(self) -> None:
        """Rollback: the source runs on (a tree the final dump left stopped resumes)."""
        if self.final_started is None:
            return  # only pre-dumps ran: the tree never stopped
        if self.connections:  # out of repair mode and unlocked before it runs
            self.connections.release()
        for pid in self.tree:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _kill_source(self) -> None:
        """Kill the stopped source; wait a little for its PIDs (its parent reaps it).
        From here on a failure is rolled back by restoring it here."""
        with interrupt.deferred():  # a half-done kill would leave it to nobody
            kill_stopped_tree(self.tree)
            self.source_killed = True
        deadline = time.monotonic() + 5
        for pid in self.tree:
            while proc.exists(pid) and time.monotonic() < deadline:
                time.sleep(0.002)

    def _restore_here(self, err: BaseException) -> MigrationFailed:
        """Same host, the source killed (or being killed) for its PIDs: restore the
        staging chain here, once the destination has let go of them. A second ^C
        does not cut this short: the tree would be lost."""
        what = _why(err)
        # Kept whatever happens: the source is in it and nowhere else.
        self.opts.images_dir = self.staging
        with interrupt.deferred():
            try:
                if not self.source_killed:  # interrupted before the kill
                    self._kill_source()
                # The link closed, the receiver undoes its restore: it kills what it
                # restored on these PIDs (at the latest after COMMIT_TIMEOUT).
                self.dest.close()
                self._wait_until_no_live_process_holds(self.tree, COMMIT_TIMEOUT + 10)
                from checkpointer.restore import RestoreRequest, restore

                final = self.staging / "final"
                res = restore(RestoreRequest(images_dir=final, detach=True, leave_stopped=False))
            except BaseException as again:
                return MigrationFailed(
                    f"migration failed restoring at the destination ({what}), and restoring "
                    f"the source here failed too ({_why(again)}); its chain is kept: "
                    f"checkpointer restore -D {self.staging / 'final'}"
                )
        return MigrationFailed(
            f"migration failed restoring at the destination ({what}); rolled back: "
            f"the source was restored here as pid {res.root_pid} (its chain is kept in "
            f"{self.staging})"
        )

    @staticmethod
    def _wait_until_no_live_process_holds(pids: list[int], timeout: float) -> None:
        """(A zombie of the killed source is left to the restore, which waits for
        its parent to reap it.)"""
        deadline = time.monotonic() + timeout
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    if proc.read_state(pid) in ("Z", "X"):
                        break
                except CheckpointError:
                    break  # gone
                time.sleep(0.01)

    def _failed(self, stage: str, err: BaseException) -> MigrationFailed:
        pid = self.opts.pid
        try:
            alive = proc.read_state(pid) not in ("Z", "X")
        except CheckpointError:
            alive = False
        became = "keeps running on the source" if alive else "is gone (it exited or was killed)"
        return MigrationFailed(
            f"migration failed {stage} ({_why(err)}); rolled back: process {pid} {became}"
        )


def _why(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, OSError) and not isinstance(err, CheckpointError):
        return f"{err.filename}: {err.strerror}" if err.filename else str(err.strerror or err)
    return str(err) or type(err).__name__
