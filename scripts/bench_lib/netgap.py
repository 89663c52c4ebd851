"""Benchmark section `redis-gap`: how long redis under load answers nobody across
a checkpoint and restore on the same host. redis-server with keys and a
redis-benchmark GET/SET load is converged with --tcp-established (which kills it)
and restored with `restore -d`. Two probes run throughout: a client that keeps
one connection and sends PING every millisecond (the gap a connection kept
across the checkpoint sees), and one that connects anew every 10 ms (the gap a
new client sees: connection refused while the port is closed)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from bench_lib.core import TempDir, cp, median, say, start_redis


class _Probe(threading.Thread):
    """Records the longest time between two answers."""

    def __init__(self, port: int, fresh: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.fresh = port, fresh
        self.stop = threading.Event()
        self.longest = 0.0
        self.answers = 0
        self.broken = False  # the kept connection failed

    def _ping(self, sock: socket.socket) -> None:
        sock.sendall(b"PING\r\n")
        if sock.recv(64) != b"+PONG\r\n":
            raise OSError("not a PONG")

    def run(self) -> None:
        last = time.monotonic()
        kept = None if self.fresh else socket.create_connection(("127.0.0.1", self.port))
        while not self.stop.is_set():
            try:
                if kept is not None:
                    self._ping(kept)
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                        self._ping(s)
                now = time.monotonic()
                self.longest = max(self.longest, now - last)
                last = now
                self.answers += 1
            except OSError:
                if kept is not None:
                    self.broken = True
                    return
            time.sleep(0.001 if kept is not None else 0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_gap(keys: int, runs: int, base: str | None) -> dict:
    rows = []
    for i in range(runs):
        say(f"redis-gap: run {i + 1} of {runs}, {keys} keys")
        with TempDir("bench-redisgap-", base) as tmp:
            port = _free_port()
            w = start_redis(tmp / "redis", keys, 64, port=port)
            pid = w.pid
            probes = [_Probe(port, fresh=False), _Probe(port, fresh=True)]
            try:
                for p in probes:
                    p.start()
                time.sleep(1)
                conv = cp("converge", "-t", str(pid), "-D", str(tmp / "images"),
                          "--tcp-established")  # fmt: skip
                w.proc.wait(timeout=60)
                rest = cp("restore", "-D", str(tmp / "images" / "final"), "-d")
                time.sleep(3)  # retransmissions and reconnects settle
                for p in probes:
                    p.stop.set()
                    p.join(timeout=10)
                kept, fresh = probes
                rows.append({
                    "final_frozen_ms": conv.json["downtime_ms"] if conv.json else None,
                    "converge_wall_s": conv.wall_s,
                    "restore_wall_s": rest.wall_s,
                    "kept_gap_ms": kept.longest * 1e3,
                    "kept_alive": not kept.broken,
                    "new_client_gap_ms": fresh.longest * 1e3,
                })  # fmt: skip
            except Exception as err:  # noqa: BLE001 - reported, not raised
                rows.append({"error": f"{type(err).__name__}: {str(err)[-300:]}"})
            finally:
                for p in probes:
                    p.stop.set()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                w.kill()
    good = [r for r in rows if "error" not in r]
    summary = {
        k: median([r[k] for r in good])
        for k in ("final_frozen_ms", "restore_wall_s", "kept_gap_ms", "new_client_gap_ms")
        if good and all(r[k] is not None for r in good)
    }
    return {"keys": keys, "runs": rows, "median": summary}
