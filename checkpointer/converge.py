"""The converging pre-dump loop: pre-dump while the target runs until what is
left to copy is small, then freeze it once for a short final dump.

Stop rules, checked after every pre-dump (the first that holds ends the loop):
- min-pages: the iteration wrote `min_pages` pages or fewer (CRIU's
  live-migration companion: 64);
- downtime: the predicted final dump time, the pages this iteration wrote at
  the copy rate measured in this run, fits within `max_downtime_ms` (QEMU's rule);
- grow: the iteration wrote more than `max_grow` percent more than the previous
  one: the target dirties memory faster than it is copied (not converging);
- max-iterations: `max_iterations` pre-dumps done (not converging if the
  others never held).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from checkpointer import interrupt
from checkpointer.dump import DumpRequest, DumpResult, dump, pre_dump
from checkpointer.fdstate.tree import RepairedConnections
from checkpointer.freezer import Thaw

CONVERGED_RULES = ("min-pages", "downtime")


@dataclass
class ConvergeOptions:
    pid: int
    images_dir: Path
    tracker: str = "auto"
    max_iterations: int = 8
    min_pages: int = 64
    max_grow: float = 10.0  # percent
    max_downtime_ms: float = 300.0
    interval_ms: float = 0.0
    thaw: Thaw = Thaw.KILL
    tcp_established: bool = False  # the final dump keeps established TCP connections
    hold_connections: bool = False  # ... and a stopped tree keeps them repaired (dump.py)
    progress: bool | None = False
    shell_job: bool = False  # for the final dump

    def __post_init__(self) -> None:
        self.images_dir = Path(self.images_dir)


@dataclass
class Iteration:
    number: int
    directory: str
    kind: str
    pages_written: int
    bytes_written: int  # raw bytes of the pages copied
    bytes_compressed: int
    duration_ms: float
    frozen_ms: float
    dirty_rate_pages_s: float  # pages written per second of the interval before it
    copy_rate_pages_s: float
    tracker: str


@dataclass
class ConvergeResult:
    final_dir: Path
    iterations: list[Iteration] = field(default_factory=list)
    stop_rule: str = ""
    converged: bool = False
    downtime_ms: float = 0.0
    chain_bytes: int = 0
    bytes_raw: int = 0
    compression_ratio: float = 0.0
    tracker: str = ""
    connections: RepairedConnections | None = None  # held by the final dump

    def to_json(self) -> dict:
        out = asdict(replace(self, connections=None))
        del out["connections"]
        out["final_dir"] = str(self.final_dir)
        return out


def converge(
    opts: ConvergeOptions, on_iteration: Callable[[Iteration], None] | None = None
) -> ConvergeResult:
    created = not opts.images_dir.exists()
    opts.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return _converge(opts, on_iteration)
    except BaseException:
        if created and not any(opts.images_dir.iterdir()):
            opts.images_dir.rmdir()  # the first pass failed: nothing to keep
        raise


def _converge(
    opts: ConvergeOptions, on_iteration: Callable[[Iteration], None] | None
) -> ConvergeResult:
    result = ConvergeResult(final_dir=opts.images_dir / "final")
    parent: str | None = None
    tracker = opts.tracker
    last_start = time.monotonic()
    for number in range(1, opts.max_iterations + 1):
        interrupt.check()
        name = f"pre-{number}"
        started = time.monotonic()
        res = pre_dump(_request(opts, name, parent, tracker, number))
        tracker = res.tracker  # keep what auto chose for the rest of the chain
        it = _iteration(number, name, "pre-dump", res, started, last_start)
        last_start = started
        result.iterations.append(it)
        if on_iteration:
            on_iteration(it)
        parent = f"../{name}"
        rule = _stop_rule(opts, result.iterations)
        if rule:
            result.stop_rule = rule
            break
        if opts.interval_ms:
            time.sleep(opts.interval_ms / 1000)
    interrupt.check()  # never on to the final dump (it kills) after ^C, even a lost one
    started = time.monotonic()
    final_req = _request(opts, "final", parent, tracker, len(result.iterations) + 1)
    final_req.thaw = opts.thaw
    final_req.tcp_established = opts.tcp_established
    final_req.hold_connections = opts.hold_connections
    final_req.track_mem = opts.thaw is not Thaw.KILL
    res = dump(final_req)
    result.connections = res.connections
    it = _iteration(len(result.iterations) + 1, "final", "dump", res, started, last_start)
    result.iterations.append(it)
    if on_iteration:
        try:
            on_iteration(it)
        except BaseException:
            if res.connections:  # the caller gets them only if converge returns
                res.connections.release()
            raise
    result.converged = result.stop_rule in CONVERGED_RULES
    result.downtime_ms = it.frozen_ms
    result.tracker = tracker
    result.chain_bytes = sum(_dir_bytes(opts.images_dir / i.directory) for i in result.iterations)
    result.bytes_raw = sum(i.bytes_written for i in result.iterations)
    compressed = sum(i.bytes_compressed for i in result.iterations)
    result.compression_ratio = result.bytes_raw / compressed if compressed else 0.0
    return result


def _request(opts: ConvergeOptions, name: str, parent, tracker: str, number: int) -> DumpRequest:
    return DumpRequest(
        pid=opts.pid,
        images_dir=opts.images_dir / name,
        prev_images_dir=parent,
        tracker=tracker,
        progress=opts.progress,
        iteration=number,
        shell_job=opts.shell_job,
    )


def _iteration(number, name, kind, res: DumpResult, started, last_start) -> Iteration:
    s = res.stats
    duration = time.monotonic() - started
    copy_s = (s["memdump_time"] + s["memwrite_time"]) / 1e6
    interval = started - last_start if number > 1 else 0.0
    return Iteration(
        number=number,
        directory=name,
        kind=kind,
        pages_written=s["pages_written"],
        bytes_written=s["bytes_raw"],
        bytes_compressed=s["bytes_compressed"],
        duration_ms=duration * 1000,
        frozen_ms=s["frozen_time"] / 1000,
        dirty_rate_pages_s=s["pages_written"] / interval if interval > 0 else 0.0,
        copy_rate_pages_s=(s["pages_written"] + s["pages_zero"]) / copy_s if copy_s > 0 else 0.0,
        tracker=res.tracker,
    )


def _stop_rule(opts: ConvergeOptions, its: list[Iteration]) -> str:
    last = its[-1]
    if last.pages_written <= opts.min_pages:
        return "min-pages"
    rate = max((i.copy_rate_pages_s for i in its), default=0.0)
    if rate > 0 and last.pages_written / rate * 1000 <= opts.max_downtime_ms:
        return "downtime"
    if len(its) >= 2 and last.pages_written > its[-2].pages_written * (1 + opts.max_grow / 100):
        return "grow"
    if len(its) >= opts.max_iterations:
        return "max-iterations"
    return ""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0
