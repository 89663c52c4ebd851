"""Side by side with a native CRIU: full dumps of the same target on this kernel.

For each size, both modes, three repetitions with the tools' order alternating:
`dump --leave-running` (one target for every run) and a kill-mode dump (a fresh
target each run). Before every measured run about 2 GiB are touched and freed
for both tools alike: this VM's balloon hands idle memory back to the host, and
the next dump would fault it back in inside its frozen window (KERNEL-NOTES §6).
Reported: frozen time (each tool's own stats), time until the images are safe
(the tool's wall time plus a `sync -f` of the images dir: checkpointer fsyncs
before it exits, CRIU does not), image size, tool RSS, and checkpointer's
end-to-end rate next to the raw /proc/PID/mem read of the same run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import time

from bench_lib import criustats
from bench_lib.core import (
    MiB,
    TempDir,
    anon_ranges,
    dir_bytes,
    median,
    raw_read_rate,
    run_timed,
    say,
    start_target,
)
from bench_lib.core import cp as run_cp
from bench_lib.nativecriu import VERSION, native_criu

SETTLE_BYTES = 2 << 30
TOOLS = ("checkpointer", "criu")


def settle_memory() -> None:
    """Touch and free SETTLE_BYTES, so neither tool pays the balloon's refill."""
    area = mmap.mmap(-1, SETTLE_BYTES)
    ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(area)), 1, SETTLE_BYTES)
    area.close()


def native(sizes_mb: list[int], base: str | None, reps: int = 3) -> dict:
    """Both modes at the first size; leave-running only at the others (the flatness of
    frozen time per GiB)."""
    criu = str(native_criu())
    version = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout
    check = subprocess.run([criu, "check"], capture_output=True, text=True)
    rows = []
    for mb in sizes_mb:
        for mode in ("leave-running", "kill") if mb == sizes_mb[0] else ("leave-running",):
            say(f"native: {mb} MiB, {mode}, {reps} x both tools")
            rows.append(_mode(criu, mb, mode, base, reps))
    return {
        "criu": version.strip() or VERSION,
        "criu_check": (check.stdout + check.stderr).strip()[-300:],
        "rows": rows,
    }


def _mode(criu: str, mb: int, mode: str, base: str | None, reps: int) -> dict:
    runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    raw = []
    with TempDir("bench-native-", base) as tmp:
        w = None
        try:
            for rep in range(reps):
                for tool in TOOLS if rep % 2 == 0 else reversed(TOOLS):
                    if w is None:
                        w = start_target(tmp / "t", mb, "--threads", "1")
                        ranges = anon_ranges(w.pid)
                        raw_gbs, present = raw_read_rate(w.pid, ranges)
                        raw.append(raw_gbs)
                    images = tmp / f"{tool}-{rep}"
                    images.mkdir()
                    settle_memory()
                    one = (_checkpointer if tool == "checkpointer" else _criu)(
                        criu, w.pid, images, mode
                    )
                    one["present_bytes"] = present
                    runs[tool].append(one)
                    if mode == "kill":
                        w.kill()
                        w = None
        finally:
            if w is not None:
                w.kill()
    return _summary(mb, mode, runs, raw)


def _checkpointer(_criu: str, pid: int, images: os.PathLike, mode: str) -> dict:
    args = ["dump", "-t", str(pid), "-D", str(images / "d")]
    run = run_cp(*args, *(["--leave-running"] if mode == "leave-running" else []))
    s = run.json["stats"]
    return {
        "frozen_ms": s["frozen_time"] / 1000,
        "snapshot": s.get("snapshot", "none"),
        "wall_s": run.wall_s,
        "safe_s": run.wall_s + _sync(images),
        "image_bytes": dir_bytes(images),
        "rss_mb": run.rss_kb / 1024,
        "cpu_s": run.cpu_s,
    }


def _criu(criu: str, pid: int, images: os.PathLike, mode: str) -> dict:
    argv = [criu, "dump", "-t", str(pid), "-D", str(images), "-o", "criu.log", "-v2"]
    run = run_timed(argv + (["--leave-running"] if mode == "leave-running" else []))
    if run.rc != 0:
        log = (images / "criu.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{' '.join(argv)} failed ({run.rc}): {log}")
    s = criustats.read(images / "stats-dump")
    return {
        "frozen_ms": s.get("frozen_time", 0) / 1000,
        "wall_s": run.wall_s,
        "safe_s": run.wall_s + _sync(images),
        "image_bytes": dir_bytes(images) - (images / "criu.log").stat().st_size,
        "rss_mb": run.rss_kb / 1024,
        "cpu_s": run.cpu_s,
    }


def _sync(images: os.PathLike) -> float:
    started = time.monotonic()
    subprocess.run(["sync", "-f", str(images)], check=True)
    return time.monotonic() - started


def _summary(mb: int, mode: str, runs: dict[str, list[dict]], raw: list[float]) -> dict:
    med = {
        tool: {key: median([r[key] for r in rs]) for key in rs[0] if key != "snapshot"}
        for tool, rs in runs.items()
    }
    cp, cr = med["checkpointer"], med["criu"]
    return {
        "target_mb": mb,
        "mode": mode,
        "runs": runs,
        "median": med,
        "snapshot": [r.get("snapshot") for r in runs["checkpointer"]],
        "raw_read_gbs": median(raw),
        "frozen_ratio": cp["frozen_ms"] / cr["frozen_ms"] if cr["frozen_ms"] else 0.0,
        "safe_ratio": cp["safe_s"] / cr["safe_s"] if cr["safe_s"] else 0.0,
        "frozen_ms_per_gib": cp["frozen_ms"] / (mb * MiB / (1 << 30)),
        "e2e_over_raw": (cp["present_bytes"] / cp["wall_s"] / 1e9) / median(raw) if raw else 0.0,
    }


def render(r: dict) -> str:
    """The markdown table of the native section."""
    head = [
        "target",
        "mode",
        "ckpt frozen ms",
        "CRIU frozen ms",
        "frozen ratio",
        "ckpt ms/GiB",
        "ckpt safe s",
        "CRIU safe s",
        "safe ratio",
        "ckpt MB",
        "CRIU MB",
        "ckpt RSS MiB",
        "CRIU RSS MiB",
        "e2e/raw",
    ]
    lines = [
        f"### Native, side by side with {r['criu'].splitlines()[0] if r['criu'] else 'CRIU'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for x in r["rows"]:
        cp, cr = x["median"]["checkpointer"], x["median"]["criu"]
        cells = [
            f"{x['target_mb']} MiB",
            x["mode"],
            f"{cp['frozen_ms']:.0f}",
            f"{cr['frozen_ms']:.0f}",
            f"{x['frozen_ratio']:.2f}",
            f"{x['frozen_ms_per_gib']:.0f}",
            f"{cp['safe_s']:.2f}",
            f"{cr['safe_s']:.2f}",
            f"{x['safe_ratio']:.2f}",
            f"{cp['image_bytes'] / 1e6:.0f}",
            f"{cr['image_bytes'] / 1e6:.0f}",
            f"{cp['rss_mb']:.0f}",
            f"{cr['rss_mb']:.0f}",
            f"{x['e2e_over_raw']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Medians of 3 alternating runs per tool; ratios are checkpointer / CRIU."]
    return "\n".join(lines)
