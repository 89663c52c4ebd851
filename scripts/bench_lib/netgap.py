"""Benchmark section `redis-gap`: how long redis under load answers nobody across
a checkpoint and restore on the same host. redis-server with keys and a
redis-benchmark GET/SET load is checkpointed with --tcp-established (which kills
it) and restored detached. Two probes run throughout: a client that keeps one
connection and sends PING every millisecond (the gap a connection kept across the
checkpoint sees), and one that connects anew every 10 ms (the gap a new client
sees: connection refused while the port is closed). The new client ends each
connection with QUIT, so redis closes first: a connection its client closed and
redis not yet (close-wait) is refused by checkpointer's dump, and the probe would
make that race likely.

Tools: checkpointer (`converge --tcp-established`, then `restore -d`) and CRIU:
natively the one scripts/bench builds (nativecriu.py), with `criu dump` alone
(its pre-dump needs soft-dirty, which this kernel lacks); in the guest, CRIU
(`criu pre-dump --track-mem`, `criu dump --tcp-established --prev-images-dir ../1
--skip-in-flight`, then `criu restore -d --tcp-established`), alternating run by
run on a fresh redis each time. CRIU refuses a connection still in the listener's
accept queue unless told to skip it; checkpointer does not dump that queue either
(the client's connection is lost)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_lib import criustats
from bench_lib.core import Run, TempDir, cp, median, run_timed, say, start_redis


class _Probe(threading.Thread):
    """Records the longest time between two answers."""

    def __init__(self, port: int, fresh: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.fresh = port, fresh
        self.stop = threading.Event()
        self.longest = 0.0
        self.silence = (0.0, 0.0)  # monotonic start and end of the longest silence
        self.last = 0.0  # monotonic time of the last answer
        self.answers = 0
        self.broken = False  # the kept connection failed

    def _ping(self, sock: socket.socket) -> None:
        sock.sendall(b"PING\r\n")
        if sock.recv(64) != b"+PONG\r\n":
            raise OSError("not a PONG")

    def _ping_quit(self, sock: socket.socket) -> None:
        sock.sendall(b"PING\r\nQUIT\r\n")
        data = b""
        while chunk := sock.recv(64):  # until redis closes
            data += chunk
        if data != b"+PONG\r\n+OK\r\n":
            raise OSError("not a PONG")

    def run(self) -> None:
        self.last = time.monotonic()
        kept = None
        if not self.fresh:  # a lost connection must not hang the probe for ever
            kept = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        while not self.stop.is_set():
            try:
                if kept is not None:
                    self._ping(kept)
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                        self._ping_quit(s)
                now = time.monotonic()
                if now - self.last > self.longest:
                    self.longest, self.silence = now - self.last, (self.last, now)
                self.last = now
                self.answers += 1
            except OSError:
                if kept is not None:
                    self.broken = True
                    return
            time.sleep(0.001 if kept is not None else 0.01)

    def gap_s(self, now: float) -> float:
        """The longest silence, counting one still going on."""
        return max(self.longest, now - self.last)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis(port: int, *cmd: str) -> bytes:
    """One command on a new connection; its reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(" ".join(cmd).encode() + b"\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _info_int(port: int, field: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"INFO stats\r\n")
        data = b""
        while field.encode() + b":" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(field + ":"):
            return int(line.split(":")[1])
    raise RuntimeError(f"no {field} in INFO")


CRIU = {"binary": "criu", "pre_dump": True}  # natively: the built one, no pre-dump


def _criu(argv: list[str], images: Path, log: str) -> Run:
    run = run_timed([CRIU["binary"], *argv, "-D", str(images), "-o", log, "-v2"])
    if run.rc != 0:
        tail = (images / log).read_text(errors="replace")[-1500:]
        raise RuntimeError(f"criu {' '.join(argv)} failed ({run.rc}): {tail}")
    return run


def _checkpoint(tool: str, tracker: str, pid: int, images: Path) -> tuple[Run, float | None]:
    """Checkpoint (killing redis); the run and the final dump's frozen ms."""
    if tool == "criu":
        (images / "1").mkdir(parents=True)
        (images / "2").mkdir()
        argv = ["dump", "-t", str(pid), "--tcp-established", "--skip-in-flight"]
        if CRIU["pre_dump"]:
            _criu(["pre-dump", "-t", str(pid), "--track-mem"], images / "1", "pre-dump.log")
            argv += ["--track-mem", "--prev-images-dir", "../1"]
        run = _criu(argv, images / "2", "dump.log")
        frozen = criustats.read(images / "2" / "stats-dump").get("frozen_time")
        return run, None if frozen is None else frozen / 1000
    run = cp("converge", "-t", str(pid), "-D", str(images), "--tcp-established",
             "--tracker", tracker)  # fmt: skip
    return run, run.json["downtime_ms"] if run.json else None


def _restore(tool: str, images: Path, waiting: subprocess.Popen | None) -> Run:
    if tool == "criu":
        return _criu(["restore", "-d", "--tcp-established"], images / "2", "restore.log")
    if waiting is not None:  # started before the checkpoint: it restores by itself
        started = time.monotonic()
        out, err = waiting.communicate(timeout=600)
        run = Run(waiting.args, waiting.returncode, time.monotonic() - started, 0, 0.0, 0.0,
                  out, err)  # fmt: skip
        return run.check()
    return cp("restore", "-D", str(images / "final"), "-d")


def _start_waiting_restore(images: Path) -> subprocess.Popen:
    """`restore --wait` on the final dump to come, once it is looking for it."""
    argv = [sys.executable, "-m", "checkpointer", "restore", "-D", str(images / "final"),
            "--wait", "3600", "-d", "--json", "-v"]  # fmt: skip
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    if "waiting for a dump" not in line:
        p.kill()
        raise RuntimeError(f"restore --wait did not start: {line}{p.stderr.read()[-500:]}")
    return p


def tool_name(tool: str, tracker: str) -> str:
    if tool == "criu":
        return tool
    return f"checkpointer {tracker}" + (", restore --wait" if tool == "checkpointer-wait" else "")


def _one(tool: str, tracker: str, keys: int, settle_s: float, tmp: Path) -> dict:
    port = _free_port()
    w = start_redis(tmp / "redis", keys, 64, port=port)
    pid = w.pid
    probes = [_Probe(port, fresh=False), _Probe(port, fresh=True)]
    waiting = None
    try:
        if tool == "checkpointer-wait":
            waiting = _start_waiting_restore(tmp / "images")
        for p in probes:
            p.start()
        time.sleep(1)
        keys_before = int(_redis(port, "DBSIZE")[1:])
        conv, frozen_ms = _checkpoint(tool, tracker, pid, tmp / "images")
        checkpointed_at = time.monotonic()
        w.proc.wait(timeout=120)  # reaped: its PID is free for the restore
        rest = _restore(tool, tmp / "images", waiting)
        restored_at = time.monotonic()
        seen = what_probes_saw(probes, port, settle_s, restored_at)
        kept = probes[0]
        return {
            **seen,
            "tool": tool_name(tool, tracker),
            "final_frozen_ms": frozen_ms,
            "checkpoint_wall_s": conv.wall_s,
            "restore_wall_s": rest.wall_s,
            # The kept connection's silence, split: until the checkpoint command
            # exited, then until the first answer (the restore command, or most of it).
            "kept_gap_split_ms": [
                (checkpointed_at - kept.silence[0]) * 1e3,
                (kept.silence[1] - checkpointed_at) * 1e3,
            ],
            "keys_before": keys_before,
        }
    finally:
        for p in probes:
            p.stop.set()
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.kill()


def what_probes_saw(probes: list[_Probe], port: int, settle_s: float, back_at: float) -> dict:
    """After the service is `back_at` (monotonic): let the probes run `settle_s` more
    (the kept connection's retransmission, reconnects), stop them, and report their
    longest silences, whether the kept connection answered after, the keys, and
    whether the load goes on."""
    time.sleep(settle_s)
    now = time.monotonic()
    for p in probes:
        p.stop.set()
        p.join(timeout=10)
    kept, fresh = probes
    served = _info_int(port, "total_commands_processed")
    time.sleep(1)
    return {
        "kept_gap_ms": kept.gap_s(now) * 1e3,
        "kept_alive": not kept.broken and kept.last > back_at,
        "new_client_gap_ms": fresh.gap_s(now) * 1e3,
        "keys_after": int(_redis(port, "DBSIZE")[1:]),
        "load_alive": _info_int(port, "total_commands_processed") > served + 100,
    }


SUMMED = ("final_frozen_ms", "restore_wall_s", "kept_gap_ms", "new_client_gap_ms")


def redis_gap(
    keys: int,
    runs: int,
    base: str | None,
    tools: tuple[str, ...] = ("checkpointer",),
    tracker: str = "auto",
    settle_s: float = 3.0,
    criu: str | None = None,
) -> dict:
    """`runs` rounds; in each, every tool once on a fresh redis, the order
    alternating round by round. `criu`: a CRIU binary to use without pre-dump
    (natively), instead of the guest's `criu` with one."""
    if criu is not None:
        CRIU.update(binary=criu, pre_dump=False)
    rows = []
    for i in range(runs):
        order = tools if i % 2 == 0 else tools[::-1]
        for tool in order:
            say(f"redis-gap: run {i + 1} of {runs}, {tool}, {keys} keys")
            with TempDir("bench-redisgap-", base) as tmp:
                try:
                    row = _one(tool, tracker, keys, settle_s, tmp)
                except Exception as err:  # noqa: BLE001 - reported, not raised
                    name = tool_name(tool, tracker)
                    row = {"tool": name, "error": f"{type(err).__name__}: {str(err)[-600:]}"}
            row["run"] = i + 1
            rows.append(row)
    medians: dict = {}
    for name in dict.fromkeys(r["tool"] for r in rows):
        good = [r for r in rows if r["tool"] == name and "error" not in r]
        medians[name] = {
            k: median([r[k] for r in good])
            for k in SUMMED
            if good and all(r[k] is not None for r in good)
        }
    out = {"keys": keys, "runs": rows, "median": medians}
    names = list(medians)
    crius = [n for n in names if n == "criu"]
    ours = [n for n in names if n != "criu"]
    if crius:
        b = medians["criu"]
        out["ratio_vs_criu"] = {
            name: {
                k: medians[name][k] / b[k]
                for k in ("kept_gap_ms", "new_client_gap_ms")
                if k in medians[name] and k in b
            }
            for name in ours
        }
    return out
