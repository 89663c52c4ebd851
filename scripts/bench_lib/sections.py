"""The benchmark sections. Each returns a JSON-able dict; report.py renders it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench_lib import criustats
from bench_lib.core import (
    PAGE,
    GiB,
    MiB,
    TempDir,
    Workload,
    anon_ranges,
    cp,
    dir_bytes,
    median,
    raw_read_rate,
    run_timed,
    say,
    start_pydict,
    start_redis,
    start_target,
    start_writer,
)
from bench_lib.native import settle_memory

INTERVAL_S = 1.0  # between the passes of a chain


def available_trackers() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "checkpointer", "check", "--json"], capture_output=True, text=True
    )
    feats = {f["name"]: f["ok"] for f in json.loads(out.stdout)["features"]}
    names = []
    if feats.get("soft-dirty"):
        names.append("soft-dirty")
    if feats.get("uffd-wp-async") and feats.get("pagemap-scan"):
        names.append("uffd-wp")
    return names + ["full"]


# ---------------------------------------------------------------- 1. throughput


def throughput(sizes_mb: list[int], base: str | None) -> dict:
    rows = []
    for mb in sizes_mb:
        say(f"throughput: {mb} MiB target")
        with TempDir("bench-tp-", base) as tmp:
            w = start_target(tmp, mb, "--threads", "1")
            try:
                ranges = anon_ranges(w.pid)
                raw_gbs, nbytes = raw_read_rate(w.pid, ranges)
                run = cp("dump", "-t", str(w.pid), "-D", str(tmp / "d"), "--leave-running")
                s = run.json["stats"]
                copy_s = (s["memdump_time"] + s["memwrite_time"]) / 1e6
                rows.append(
                    {
                        "target_mb": mb,
                        "present_bytes": nbytes,
                        "raw_read_gbs": raw_gbs,
                        "dump_wall_s": run.wall_s,
                        "dump_e2e_gbs": nbytes / run.wall_s / 1e9,
                        "dump_copy_gbs": s["bytes_raw"] / copy_s / 1e9 if copy_s else 0.0,
                        "memdump_s": s["memdump_time"] / 1e6,
                        "memwrite_s": s["memwrite_time"] / 1e6,
                        "read_only_gbs": s["bytes_raw"] / (s["memdump_time"] / 1e6) / 1e9,
                        "frozen_ms": s["frozen_time"] / 1000,
                        "tool_rss_mb": run.rss_kb / 1024,
                        "tool_cpu_s": run.cpu_s,
                        "image_bytes": dir_bytes(tmp / "d"),
                        "bytes_raw": s["bytes_raw"],
                    }
                )
            finally:
                w.kill()
    return {"rows": rows}


# ---------------------------------------------------------------- 2. trackers


def trackers(
    size_mb: int, trackers_: list[str], base: str | None, iterations: int = 3, pass_mb: int = 256
) -> dict:
    hot = max(1, size_mb * MiB // PAGE // 1000)  # 0.1% of the pages
    rows = []
    for tracker in trackers_:
        say(f"trackers: {tracker} on {size_mb} MiB, {hot} hot pages")
        with TempDir("bench-tr-", base) as tmp:
            w = start_target(
                tmp, size_mb, "--threads", "1", "--hot-pages", str(hot), "--hot-sleep-us", "1000"
            )
            try:
                its = _chain_cp(w, tmp, tracker, iterations, final=False)
            finally:
                w.kill()
        inc = its[1:]
        wall = median([i["wall_s"] for i in inc])
        rows.append(
            {
                "tracker": tracker,
                "target_mb": size_mb,
                "hot_pages": hot,
                "iterations": its,
                "first_wall_s": its[0]["wall_s"],
                "inc_wall_s": wall,
                "inc_s_per_gib": wall / (size_mb / 1024),
                "inc_cpu_s": median([i["cpu_s"] for i in inc]),
                "inc_pages": median([i["pages_written"] for i in inc]),
                "inc_bytes": median([i["bytes"] for i in inc]),
                "tool_rss_mb": max(i["rss_mb"] for i in its),
            }
        )
    return {"rows": rows, "write_slowdown": write_slowdown(pass_mb, trackers_, base)}


def write_slowdown(mb: int, trackers_: list[str], base: str | None) -> dict:
    """The writer's own memset time over MB MiB, untracked vs tracked."""
    say(f"trackers: write slowdown, {mb} MiB memset passes")
    out: dict = {"mb": mb}
    with TempDir("bench-ws-", base) as tmp:
        w = start_writer(tmp, mb, passes=True)
        try:

            def passes(n: int) -> list[float]:
                return [int(w.command("pass").split()[1]) / 1e6 for _ in range(n)]

            out["untracked_ms"] = median(passes(7))
            # full first: uffd-wp registration stays with the target once made.
            for tracker in sorted((t for t in trackers_ if t != "soft-dirty"), key=len):
                d = tmp / tracker
                cp("pre-dump", "-t", str(w.pid), "-D", str(d / "1"), "--tracker", tracker)
                first = passes(1)[0]
                second = median(passes(3))
                cp(
                    "pre-dump",
                    "-t",
                    str(w.pid),
                    "-D",
                    str(d / "2"),
                    "--tracker",
                    tracker,
                    "--prev-images-dir",
                    "../1",
                )
                again = passes(1)[0]
                out[tracker] = {"after_reset_ms": [first, again], "no_reset_ms": second}
        finally:
            w.kill()
    return out


# ---------------------------------------------------------------- 3. converge


def converge(size_mb: int, base: str | None, hot_pct: float = 1.0) -> dict:
    """Both ways converge ends: --leave-running (the tree runs on after its final
    dump) and kill (the migration case: the final dump's window is the downtime
    until the restore). Each against a plain dump in the same mode, frozen for
    its whole copy (--no-snapshot: the window converge exists to shorten)."""
    hot = int(size_mb * MiB // PAGE * hot_pct / 100)
    modes = {}
    for mode in ("leave-running", "kill"):
        say(f"converge ({mode}): {size_mb} MiB, {hot} hot pages")
        modes[mode] = _converge_mode(mode, size_mb, hot, base)
    return {"target_mb": size_mb, "hot_pages": hot, "modes": modes}


def _converge_mode(mode: str, size_mb: int, hot: int, base: str | None) -> dict:
    args = ("--threads", "1", "--hot-pages", str(hot), "--hot-sleep-us", "1000")
    leave = ["--leave-running"] if mode == "leave-running" else []
    with TempDir("bench-cv-", base) as tmp:
        w = start_target(tmp, size_mb, *args)
        try:
            settle_memory()  # the balloon's refill, out of both windows alike
            plain = cp("dump", "-t", str(w.pid), "-D", str(tmp / "plain"), *leave,
                       "--no-snapshot")  # fmt: skip
            if not leave:  # the plain dump killed it: converge a fresh one
                w.kill()
                w = start_target(tmp, size_mb, *args, name="target2")
            settle_memory()
            conv = cp("converge", "-t", str(w.pid), "-D", str(tmp / "conv"), *leave)
        finally:
            w.kill()
    c = conv.json
    plain_ms = plain.json["stats"]["frozen_time"] / 1000
    return {
        "plain_frozen_ms": plain_ms,
        "converge_frozen_ms": c["downtime_ms"],
        "ratio": plain_ms / c["downtime_ms"] if c["downtime_ms"] else 0.0,
        "tracker": c["tracker"],
        "stop_rule": c["stop_rule"],
        "iterations": [
            {k: i[k] for k in ("number", "kind", "pages_written", "frozen_ms", "duration_ms")}
            for i in c["iterations"]
        ],
        "converge_wall_s": conv.wall_s,
        "converge_rss_mb": conv.rss_kb / 1024,
    }


# ---------------------------------------------------------------- 4. workloads


def workload_sizes(quick: bool, guest: bool) -> dict:
    if quick:
        return {
            "idle_mb": 256,
            "writer_mb": 64,
            "writer_pct": 2.0,
            "dict_entries": 300_000,
            "redis_keys": 20_000,
            "redis_value": 1024,
        }
    return {
        "idle_mb": 1024,
        "writer_mb": 256,
        "writer_pct": 2.0,
        "dict_entries": 2_000_000,
        "redis_keys": 100_000 if guest else 200_000,
        "redis_value": 1024,
    }


def start_workload(name: str, sizes: dict, workdir: Path) -> Workload:
    if name == "idle":
        return start_target(workdir, sizes["idle_mb"], "--threads", "1", name="idle")
    if name == "writer":
        return start_writer(workdir, sizes["writer_mb"], sizes["writer_pct"])
    if name == "pydict":
        return start_pydict(workdir, sizes["dict_entries"])
    if name == "redis":
        return start_redis(workdir, sizes["redis_keys"], sizes["redis_value"])
    raise ValueError(name)


WORKLOADS = ("idle", "writer", "pydict", "redis")


def workloads(
    tools: list[str], sizes: dict, base: str | None, names: tuple[str, ...] = WORKLOADS
) -> dict:
    """Each workload once; each tool's chain pre-dump, pre-dump, final dump on it,
    one tool after the other (each chain starts with a full pre-dump)."""
    out: dict = {"sizes": sizes, "interval_s": INTERVAL_S, "workloads": {}}
    for name in names:
        entry: dict = {}
        with TempDir(f"bench-wl-{name}-", base) as tmp:
            say(f"workloads: starting {name}")
            try:
                w = start_workload(name, sizes, tmp)
            except Exception as err:  # noqa: BLE001 - report and go on
                entry["error"] = f"could not start: {err}"
                out["workloads"][name] = entry
                continue
            try:
                entry["target_rss_mb"] = w.rss_kb() / 1024
                for tool in tools:
                    say(f"workloads: {name} with {tool}")
                    try:
                        if tool == "criu":
                            entry[tool] = _chain_criu(w, tmp / tool, tcp=name == "redis")
                        else:
                            entry[tool] = _chain_cp(
                                w, tmp / tool, tool, 2, final=True, tcp=name == "redis"
                            )
                    except Exception as err:  # noqa: BLE001
                        entry[tool] = {"error": str(err)[-1500:]}
                    finally:
                        subprocess.run(["rm", "-rf", str(tmp / tool)])
            finally:
                w.kill()
        out["workloads"][name] = entry
    return out


def _chain_cp(
    w: Workload, d: Path, tracker: str, pre_dumps: int, final: bool, tcp: bool = False
) -> list[dict]:
    its = []
    for i in range(1, pre_dumps + 2 if final else pre_dumps + 1):
        if i > 1:
            time.sleep(INTERVAL_S)
        args = ["-t", str(w.pid), "-D", str(d / str(i)), "--tracker", tracker]
        if i > 1:
            args += ["--prev-images-dir", f"../{i - 1}"]
        kind = "dump" if final and i == pre_dumps + 1 else "pre-dump"
        if kind == "dump":
            args += ["--leave-running", "--track-mem"]
            if tcp:  # redis-benchmark's connections (as CRIU is asked below)
                args += ["--tcp-established"]
        run = cp(kind, *args)
        s = run.json["stats"]
        its.append(
            {
                "kind": kind,
                "frozen_ms": s["frozen_time"] / 1000,
                "pages_written": s["pages_written"],
                "pages_zero": s["pages_zero"],
                "pages_parent": s["pages_skipped_parent"],
                "bytes": dir_bytes(d / str(i)),
                "wall_s": run.wall_s,
                "cpu_s": run.cpu_s,
                "rss_mb": run.rss_kb / 1024,
                "incremental": run.json["incremental"],
            }
        )
    return its


def _chain_criu(w: Workload, d: Path, tcp: bool) -> list[dict]:
    its = []
    for i in (1, 2, 3):
        if i > 1:
            time.sleep(INTERVAL_S)
        (d / str(i)).mkdir(parents=True)
        kind = "dump" if i == 3 else "pre-dump"
        argv = [
            "criu",
            kind,
            "-t",
            str(w.pid),
            "-D",
            str(d / str(i)),
            "--track-mem",
            "-o",
            "criu.log",
            "-v2",
        ]
        if i > 1:
            argv += ["--prev-images-dir", f"../{i - 1}"]
        if kind == "dump":
            argv += ["--leave-running"]
            if tcp:
                argv += ["--tcp-established"]
        run = run_timed(argv)
        if run.rc != 0:
            log = (d / str(i) / "criu.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{' '.join(argv)} failed ({run.rc}): {log}")
        s = criustats.read(d / str(i) / "stats-dump")
        its.append(
            {
                "kind": kind,
                "frozen_ms": s.get("frozen_time", 0) / 1000,
                "pages_written": s.get("pages_written", 0),
                "pages_parent": s.get("pages_skipped_parent", 0),
                "pages_scanned": s.get("pages_scanned", 0),
                "bytes": dir_bytes(d / str(i)) - (d / str(i) / "criu.log").stat().st_size,
                "wall_s": run.wall_s,
                "cpu_s": run.cpu_s,
                "rss_mb": run.rss_kb / 1024,
                "stats": s,
            }
        )
    return its


_ = GiB
