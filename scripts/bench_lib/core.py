"""Shared pieces of scripts/bench: tool runs, workloads, raw reads, sizes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from checkpointer.kernel.pagemap import data_runs, read_pagemap  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
TIME = "/usr/bin/time"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- tool runs


@dataclass
class Run:
    """One tool run under /usr/bin/time: its JSON output and its resource use."""

    argv: list[str]
    rc: int
    wall_s: float
    rss_kb: int
    user_s: float
    sys_s: float
    stdout: str
    stderr: str
    json: dict | None = None

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def check(self) -> Run:
        if self.rc != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} failed ({self.rc}): {self.stderr.strip()[-2000:]}"
            )
        return self


def run_timed(argv: list[str], timeout: float = 3600, cwd: str | None = None) -> Run:
    """Run argv under GNU time. Its max RSS is the peak of the tool's own process
    (time forks a fresh child, so nothing of this benchmark's memory is inherited)."""
    with tempfile.NamedTemporaryFile("r", prefix="bench-time-") as tf:
        cmd = [TIME, "-f", "%M %e %U %S", "-o", tf.name, *argv]
        started = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=cwd)
        wall = time.monotonic() - started
        lines = [ln for ln in Path(tf.name).read_text().splitlines() if ln.strip()]
    rss, _elapsed, user, sys_ = lines[-1].split()
    run = Run(argv, p.returncode, wall, int(rss), float(user), float(sys_), p.stdout, p.stderr)
    out = p.stdout.strip().splitlines()
    if out and out[-1].startswith("{"):
        run.json = json.loads(out[-1])
    return run


def cp(*args: str, timeout: float = 3600) -> Run:
    """Run the checkpointer CLI of this repo with --json."""
    return run_timed([sys.executable, "-m", "checkpointer", *args, "--json"], timeout).check()


def cli_start_s() -> float:
    """Wall time of `checkpointer --version`: the interpreter + import floor of every run."""
    runs = [run_timed([sys.executable, "-m", "checkpointer", "--version"]).wall_s for _ in range(3)]
    return min(runs)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# ---------------------------------------------------------------- binaries


def build(source: Path, name: str) -> Path:
    fill = ROOT / "tests" / "targets" / "fill.h"  # included by both C programs
    digest = hashlib.sha256(source.read_bytes() + fill.read_bytes()).hexdigest()[:12]
    binary = Path(tempfile.gettempdir()) / f"checkpointer-bench-{name}-{digest}"
    if not binary.exists():
        tmp = binary.with_suffix(f".{os.getpid()}")
        subprocess.run(["gcc", "-O1", "-pthread", "-o", str(tmp), str(source)], check=True)
        tmp.rename(binary)
    return binary


def target_bin() -> Path:
    return build(ROOT / "tests" / "targets" / "target.c", "target")


def writer_bin() -> Path:
    return build(Path(__file__).with_name("writer.c"), "writer")


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A process started by the benchmark, in its own session, output to a file."""

    name: str
    proc: subprocess.Popen
    workdir: Path
    pid: int = 0
    extra: list[subprocess.Popen] = field(default_factory=list)  # load generators
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def command(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def rss_kb(self) -> int:
        for ln in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
        return 0

    def kill(self) -> None:
        for p in [*self.extra, self.proc]:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


def start(
    name: str, argv: list[str], workdir: Path, *, stdin_pipe: bool = False, timeout: float = 600
) -> Workload:
    """Start argv; wait for its "READY pid" line. Own session, no terminal: neither
    tool needs --shell-job for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    if stdin_pipe:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=ENV,
        )
        w = Workload(name, proc, workdir)
        try:
            while True:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{name} exited early ({proc.wait()})")
                if _parse(w, line):
                    return w
        except BaseException:
            w.kill()
            raise
    log = open(workdir / f"{name}.out", "w")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=ENV,
    )
    log.close()
    w = Workload(name, proc, workdir)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early ({proc.returncode})")
            for line in (workdir / f"{name}.out").read_text().splitlines():
                if _parse(w, line):
                    return w
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout} s")
    except BaseException:
        w.kill()
        raise


def _parse(w: Workload, line: str) -> bool:
    parts = line.split()
    if parts and parts[0] == "REGION":
        w.regions[parts[1]] = (int(parts[2], 16), int(parts[3]))
    if parts and parts[0] == "READY":
        w.pid = int(parts[1])
        return True
    return False


def start_target(workdir: Path, anon_mb: int, *args: str, name: str = "target") -> Workload:
    return start(name, [str(target_bin()), "--anon-mb", str(anon_mb), *args], workdir)


def start_writer(
    workdir: Path, mb: int, rate_pct: float = 0, *, passes: bool = False, name: str = "writer"
) -> Workload:
    argv = [str(writer_bin()), "--mb", str(mb)]
    if rate_pct:
        argv += ["--rate-pct", str(rate_pct)]
    return start(name, argv, workdir, stdin_pipe=passes)


PYDICT = r"""
import os, sys, time
n = int(sys.argv[1])
d = {i: ("value-%d-" % i) * 4 for i in range(n)}
print("READY", os.getpid(), flush=True)
while True:
    time.sleep(3600)
"""


def start_pydict(workdir: Path, entries: int) -> Workload:
    return start("pydict", [sys.executable, "-c", PYDICT, str(entries)], workdir)


def start_redis(workdir: Path, keys: int, value_size: int, port: int = 16379) -> Workload:
    """redis-server on 127.0.0.1, filled by redis-benchmark, then kept under a
    GET/SET load by another redis-benchmark on loopback until killed."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(workdir),
    ]
    log = open(workdir / "redis.out", "w")
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    w = Workload("redis", proc, workdir, pid=proc.pid)
    try:
        for _ in range(600):
            r = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            )
            if r.stdout.strip() == "PONG":
                break
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({proc.returncode})")
            time.sleep(0.2)
        bench = [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "-d",
            str(value_size),
            "-r",
            str(keys),
        ]
        # -r picks random keys: fill with several passes of the key space.
        subprocess.run(
            [*bench, "-t", "set", "-n", str(keys * 3), "-P", "16"],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        load = subprocess.Popen(
            [*bench, "-t", "set,get", "-n", "1000000000", "-c", "4"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        w.extra.append(load)
        time.sleep(1)
        return w
    except BaseException:
        w.kill()
        raise


# ---------------------------------------------------------------- raw reads


def anon_ranges(pid: int) -> list[tuple[int, int]]:
    """Pages with data (present or swapped, not the shared zero page) of every
    anonymous mapping (no file path, or [heap]/[stack]): the ranges a dump of these
    workloads copies, minus the few library pages."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            path = parts[5] if len(parts) > 5 else ""
            if path and path not in ("[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            entries = read_pagemap(pid, start, end)
            out += data_runs(entries, start)
    return out


def raw_read_rate(pid: int, ranges: list[tuple[int, int]], repeat: int = 3) -> tuple[float, int]:
    """(best GB/s, bytes) of os.preadv from /proc/PID/mem into one reused 8 MiB buffer."""
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    buf[:] = b"\1" * len(buf)  # pre-fault
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    best = 0.0
    nbytes = 0
    try:
        for _ in range(repeat):
            nbytes = 0
            t0 = time.perf_counter()
            for start, end in ranges:
                for a in range(start, end, len(buf)):
                    n = min(len(buf), end - a)
                    nbytes += os.preadv(fd, [view[:n]], a)
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    finally:
        os.close(fd)
    return best, nbytes


# ---------------------------------------------------------------- misc


class TempDir:
    def __init__(self, prefix: str, base: str | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
