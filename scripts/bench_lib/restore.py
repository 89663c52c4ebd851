"""Benchmark section `restore`: dump a workload (killing it), then restore it and
time that, for each size, with checkpointer and (in the guest) CRIU side by side
on the same workload and the same boot."""

from __future__ import annotations

import os
import signal
import time

from bench_lib.core import MiB, TempDir, cp, dir_bytes, run_timed, say, start_writer


def _settle() -> None:
    """Touch and free 2 GiB so the VM's balloon has handed memory back before the
    measured run (KERNEL-NOTES section 6): every tool pays the same."""
    block = bytearray(2 << 30)
    for i in range(0, len(block), 4096):
        block[i] = 1
    del block


def _gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)


def restore(sizes_mb: list[int], tools: list[str], base: str | None) -> dict:
    rows = []
    for mb in sizes_mb:
        row: dict = {"target_mb": mb}
        for tool in tools:
            say(f"restore: {mb} MiB, {tool}")
            with TempDir("bench-restore-", base) as tmp:
                w = start_writer(tmp / "w", mb)
                pid = w.pid
                images = tmp / "images"
                try:
                    if tool == "criu":
                        images.mkdir()
                        run_timed(["criu", "dump", "-t", str(pid), "-D", str(images),
                                   "-o", "dump.log"]).check()  # fmt: skip
                    else:
                        cp("dump", "-t", str(pid), "-D", str(images))
                    w.proc.wait(timeout=60)  # reaped: the PID is free again
                    _settle()
                    if tool == "criu":
                        run = run_timed(["criu", "restore", "-d", "-D", str(images),
                                         "-o", "restore.log"]).check()  # fmt: skip
                    else:
                        run = cp("restore", "-D", str(images), "-d")
                    row[tool] = {
                        "wall_s": run.wall_s,
                        "rss_mb": run.rss_kb / 1024,
                        "cpu_s": run.cpu_s,
                        "image_mb": dir_bytes(images) / MiB,
                        "restored_gbs": mb * MiB / run.wall_s / 1e9,
                    }
                finally:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    w.kill()
                    _gone(pid)
        if "criu" in row and "checkpointer" in row:
            row["ratio_vs_criu"] = row["checkpointer"]["wall_s"] / row["criu"]["wall_s"]
        rows.append(row)
    return {"rows": rows}
