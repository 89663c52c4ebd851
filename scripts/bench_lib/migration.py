"""Benchmark section `migrate`: live migration over ssh to a local sshd.

Service downtime (final dump start to running at the destination), the stream's
rate against what the same ssh path gives raw (`ssh HOST cat > /dev/null` with the
same number of bytes), and the bytes sent against the raw pages they carry (what an
uncompressed page server such as CRIU's would send for the same pages).

Beside it, CRIU does the same job as far as the kernel lets it. Natively (4.1.1) its
pre-dump needs soft-dirty (without it, it aborts: BUG at criu/mem.c), so its
migration is one frozen `dump --page-server` to a `criu page-server`, the other
image files copied over (as P.Haul or scp would), and `restore -d` there. In the
soft-dirty guest (`--vm`, Debian's 3.17) it pre-copies as P.Haul does: `pre-dump
--track-mem --page-server` twice, each to a fresh page server whose directory links
its parent, then the final `dump --page-server`. Its downtime runs from the final
dump's start to the restore's return.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_lib import criustats
from bench_lib.core import (
    PAGE,
    ROOT,
    MiB,
    TempDir,
    dir_bytes,
    median,
    say,
    start_redis,
    start_writer,
)
from bench_lib.native import settle_memory
from bench_lib.nativecriu import native_criu

sys.path.insert(0, str(ROOT / "tests"))

from sshd import remote_command, start_sshd, stop_sshd  # noqa: E402


def migration(
    size_mb: int,
    base: str | None,
    rate_pct: float = 1.0,
    tracker: str = "auto",
    reps: int = 3,
    criu: str | None = None,
    criu_pre_dumps: int = 0,
) -> dict:
    """`reps` runs of each tool, alternating which goes first; the figures are those
    of checkpointer's median-downtime run, the ratio that of the medians (this VM's
    balloon makes a restore's fresh memory cost anything from 0.4 to 0.9 s).
    `criu`: its binary (default the native build); `criu_pre_dumps`: its pre-copy
    passes (soft-dirty only)."""
    say(f"migrate: {size_mb} MiB writer at {rate_pct}% of pages per second, over ssh, "
        f"{reps} x both tools")  # fmt: skip
    criu = criu or str(native_criu())
    with TempDir("bench-mig-", base) as tmp:
        server = start_sshd(tmp / "sshd")
        ours: list[dict] = []
        theirs: list[dict] = []
        try:
            for rep in range(reps):
                for tool in ("checkpointer", "criu") if rep % 2 == 0 else ("criu", "checkpointer"):
                    run_dir = tmp / f"{tool}-{rep}"
                    run_dir.mkdir()
                    if tool == "criu":
                        theirs.append(
                            _criu_migration(criu, size_mb, rate_pct, run_dir, criu_pre_dumps)
                        )
                    else:
                        one = _migrate(server, size_mb, rate_pct, tracker, run_dir)
                        if "error" in one:
                            return one
                        ours.append(one)
                    # Images on a guest's /tmp are memory (tmpfs): one run's at a time.
                    shutil.rmtree(run_dir, ignore_errors=True)
            res = sorted(ours, key=lambda r: r["downtime_ms"])[len(ours) // 2]
            streamed = res["bytes_streamed"]
            stream_s = sum(i["send_ms"] for i in res["iterations"]) / 1000
            # The machine is shared: the raw figure is the median of three runs.
            raw_s = median([_raw_ssh_seconds(server, tmp / "blob", streamed) for _ in range(3)])
            raw_pages = sum(i["pages_written"] for i in res["iterations"]) * PAGE
            good = [c for c in theirs if "error" not in c]
            return {
                **res,
                "target_mb": size_mb,
                "rate_pct": rate_pct,
                "downtimes_ms": [r["downtime_ms"] for r in ours],
                "stream_mb_s": streamed / stream_s / 1e6 if stream_s else 0.0,
                "raw_ssh_mb_s": streamed / raw_s / 1e6 if raw_s else 0.0,
                "raw_page_bytes": raw_pages,
                "bytes_vs_raw_pages": streamed / raw_pages if raw_pages else 0.0,
                "memory_bytes": size_mb * MiB,
                "criu": (
                    sorted(good, key=lambda c: c["downtime_ms"])[len(good) // 2]
                    if good
                    else (theirs[0] if theirs else {"error": "not run"})
                ),
                "criu_version": _version(criu),
                "criu_pre_dumps": criu_pre_dumps,
                "criu_downtimes_ms": [c["downtime_ms"] for c in good],
            }
        finally:
            stop_sshd(server)


def _migrate(server, size_mb: int, rate_pct: float, tracker: str, tmp: Path) -> dict:
    """One `checkpointer migrate` of a fresh writer to the local sshd."""
    w = start_writer(tmp / "w", size_mb, rate_pct)
    threading.Thread(target=w.proc.wait, daemon=True).start()  # frees its PID
    return _migrate_workload(server, w, tracker, tmp)


def _migrate_workload(
    server, w, tracker: str, tmp: Path, *extra: str, cleanup: bool = True
) -> dict:
    """One `checkpointer migrate` of the running workload `w` to the local sshd; w
    and what was restored are killed at the end, unless not `cleanup`."""
    res: dict = {}
    try:
        settle_memory()
        argv = [sys.executable, "-m", "checkpointer", "migrate", "-t", str(w.pid),
                "--to", server.host, *[f"--ssh-option={o}" for o in server.ssh_options],
                "--remote-command", remote_command(), "--remote-dir", str(tmp / "remote"),
                "--tracker", tracker, "--json", *extra]  # fmt: skip
        started = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - started
        if p.returncode:
            return {"error": p.stderr.strip()[-1000:]}
        res = json.loads(p.stdout)
        return {
            "migrate_wall_s": wall,
            "stop_rule": res["stop_rule"],
            "frozen_ms": res["frozen_ms"],
            "downtime_ms": res["downtime_ms"],
            "restore_ms": res["restore_ms"],
            "restore_bytes_written": res.get("restore_bytes_written", 0),
            "iterations": res["iterations"],
            "bytes_streamed": res["bytes_streamed"],
            "pids": res["pids"],
        }
    finally:
        for pid in res.get("pids", []) if cleanup else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if cleanup:
            w.kill()


def _criu_migration(
    criu: str, size_mb: int, rate_pct: float, tmp: Path, pre_dumps: int = 0
) -> dict:
    """CRIU's migration of the same writer (see the module's doc)."""
    w = start_writer(tmp / "cw", size_mb, rate_pct, name="criu-writer")
    threading.Thread(target=w.proc.wait, daemon=True).start()  # frees its PID
    return _criu_migrate_workload(criu, w, tmp, pre_dumps)


def _criu_migrate_workload(
    criu: str, w, tmp: Path, pre_dumps: int = 0, tcp: tuple[str, ...] = (), cleanup: bool = True
) -> dict:
    """CRIU's migration of the running workload `w`; `tcp`: the options its final
    dump and restore need for established connections; `cleanup` as in
    _migrate_workload."""
    restored = None
    try:
        settle_memory()
        for n in range(1, pre_dumps + 1):
            _criu_pass(criu, w.pid, tmp, n, "pre-dump", track=True)
            time.sleep(PRE_DUMP_INTERVAL_S)
        started = time.monotonic()
        final = pre_dumps + 1
        src, dst = _criu_pass(criu, w.pid, tmp, final, "dump", track=pre_dumps > 0, extra=tcp)
        dumped = time.monotonic()
        for f in src.iterdir():  # the rest of the images: what scp would carry
            if f.name != "dump.log" and not os.path.lexists(dst / f.name):
                (dst / f.name).write_bytes(f.read_bytes())
        copied = time.monotonic()
        rst = subprocess.run([criu, "restore", "-D", str(dst), "-d", "-o", "rst.log",
                              "--pidfile", str(dst / "pid"),
                              *(["--tcp-established"] if tcp else [])],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        running = time.monotonic()
        if rst.returncode:
            return {"error": f"criu restore: {_log_tail(dst / 'rst.log')}"}
        restored = int((dst / "pid").read_text())
        stats = criustats.read(src / "stats-dump")
        pages = sum(f.stat().st_size for f in tmp.glob("criu-dst-*/pages-*.img"))
        return {
            "downtime_ms": (running - started) * 1000,
            "frozen_ms": stats.get("frozen_time", 0) / 1000,
            "dump_ms": (dumped - started) * 1000,
            "copy_ms": (copied - dumped) * 1000,
            "restore_ms": (running - copied) * 1000,
            "page_bytes": pages,
            "image_bytes": dir_bytes(dst) - sum(f.stat().st_size for f in dst.glob("pages-*")),
            "pre_dumps": pre_dumps,
            "pids": [restored],
        }
    except RuntimeError as err:
        return {"error": str(err)}
    finally:
        if restored and cleanup:
            try:
                os.kill(restored, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if cleanup:
            w.kill()


PRE_DUMP_INTERVAL_S = 1.0
CRIU_TCP = ("--tcp-established", "--skip-in-flight")  # see netgap.py for the latter


def redis_migration(
    keys: int,
    base: str | None,
    tracker: str = "auto",
    reps: int = 2,
    criu: str = "criu",
    criu_pre_dumps: int = 2,
    settle_s: float = 10.0,
) -> dict:
    """redis under a redis-benchmark load migrated with its connections: `migrate
    --tcp-established` against CRIU pre-copying (CRIU_TCP on its final dump), each
    run on a fresh redis, alternating. Beside each tool's own downtime, two probes
    (netgap.py) measure what clients saw: a connection kept across, and clients
    connecting anew; the ratio is that of the medians of the kept connection's gap."""
    say(f"migrate-redis: {keys} keys under load, over ssh, {reps} x both tools")
    with TempDir("bench-migr-", base) as tmp:
        server = start_sshd(tmp / "sshd")
        runs: dict[str, list[dict]] = {"checkpointer": [], "criu": []}
        try:
            for rep in range(reps):
                for tool in ("checkpointer", "criu") if rep % 2 == 0 else ("criu", "checkpointer"):
                    run_dir = tmp / f"{tool}-{rep}"
                    run_dir.mkdir()
                    one = _redis_one(tool, server, keys, tracker, criu, criu_pre_dumps,
                                     settle_s, run_dir)  # fmt: skip
                    runs[tool].append(one)
                    shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            stop_sshd(server)
    good = {t: [r for r in rs if "error" not in r] for t, rs in runs.items()}
    out = {"keys": keys, "runs": runs, "criu_version": _version(criu),
           "criu_pre_dumps": criu_pre_dumps}  # fmt: skip
    if good["checkpointer"] and good["criu"]:
        ours = median([r["kept_gap_ms"] for r in good["checkpointer"]])
        theirs = median([r["kept_gap_ms"] for r in good["criu"]])
        out["kept_gap_ratio"] = ours / theirs
        out["downtime_ratio"] = median([r["downtime_ms"] for r in good["checkpointer"]]) / median(
            [r["downtime_ms"] for r in good["criu"]]
        )
    return out


def _redis_one(tool, server, keys, tracker, criu, pre_dumps, settle_s, tmp: Path) -> dict:
    from bench_lib.netgap import _Probe, _redis, what_probes_saw

    port = _free_port()
    w = start_redis(tmp / "redis", keys, 64, port=port)
    threading.Thread(target=w.proc.wait, daemon=True).start()  # frees its PID
    probes = [_Probe(port, fresh=False), _Probe(port, fresh=True)]
    for p in probes:
        p.start()
    time.sleep(1)
    keys_before = int(_redis(port, "DBSIZE")[1:])
    res: dict = {}
    try:
        if tool == "criu":
            res = _criu_migrate_workload(criu, w, tmp, pre_dumps, CRIU_TCP, cleanup=False)
        else:
            res = _migrate_workload(server, w, tracker, tmp, "--tcp-established", cleanup=False)
        done = time.monotonic()
        if "error" in res:
            return res
        seen = what_probes_saw(probes, port, settle_s, done)
        return {**res, **seen, "tool": tool, "keys_before": keys_before}
    except (RuntimeError, OSError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        for p in probes:
            p.stop.set()
        for pid in res.get("pids", []):  # the restored redis
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        w.kill()  # the load, and the source if it is still there


def render_redis(r: dict, title: str) -> str:
    head = f"### {title}"
    rows = []
    for tool in ("checkpointer", "criu"):
        for one in r["runs"][tool]:
            if "error" in one:
                rows.append(f"| {tool} | failed: {one['error'][:200]} | | | | | | |")
                continue
            rows.append(
                f"| {tool} | {one['downtime_ms']:.0f} | {one['frozen_ms']:.0f} "
                f"| {one['restore_ms']:.0f} | {one['kept_gap_ms']:.0f} "
                f"| {'yes' if one['kept_alive'] else 'NO'} | {one['new_client_gap_ms']:.0f} "
                f"| {one['keys_before']} / {one['keys_after']} |"
            )
    lines = [
        head, "",
        f"redis with {r['keys']} keys of 64 bytes under a redis-benchmark load, two probes "
        f"(a connection kept across, new clients every 10 ms); checkpointer `migrate "
        f"--tcp-established` over ssh; CRIU ({r['criu_version']}) {r['criu_pre_dumps']} x "
        f"`pre-dump --track-mem --page-server`, `dump {' '.join(CRIU_TCP)} --page-server`, "
        f"`restore -d --tcp-established`.", "",
        "| tool | downtime ms | frozen ms | restore ms | kept connection: gap ms | "
        "answered after | new clients: gap ms | keys before / after |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
    ]  # fmt: skip
    if "kept_gap_ratio" in r:
        lines.append(
            f"- kept connection's gap checkpointer / CRIU (medians): "
            f"**{r['kept_gap_ratio']:.2f}**; tools' downtime: **{r['downtime_ratio']:.2f}** "
            f"(goal <= 0.5)"
        )
    return "\n".join(lines)


def _criu_pass(
    criu: str, pid: int, tmp: Path, n: int, kind: str, track: bool, extra: tuple = ()
) -> tuple[Path, Path]:
    """One CRIU pass (`pre-dump` or `dump`) sending its pages to a fresh page server;
    pass n > 1 builds on n - 1, on both sides (a `parent` link in each directory).
    `track`: --track-mem (soft-dirty), on every pass of a pre-copy chain, the final
    dump too: without it CRIU takes no page from the parent (mem.c, page_in_parent)
    and sends them all again. Returns (source dir, destination dir)."""
    src, dst = tmp / f"criu-src-{n}", tmp / f"criu-dst-{n}"
    src.mkdir()
    dst.mkdir()
    parent = ["--prev-images-dir", f"../criu-src-{n - 1}"] if n > 1 else []
    if n > 1:
        (dst / "parent").symlink_to(f"../criu-dst-{n - 1}")
    port = _free_port()
    server = subprocess.Popen([criu, "page-server", "-D", str(dst), "--address", "127.0.0.1",
                               "--port", str(port), "-o", "ps.log"])  # fmt: skip
    try:
        _wait_listening(port)
        argv = [criu, kind, "-t", str(pid), "-D", str(src), "--page-server", "--address",
                "127.0.0.1", "--port", str(port), *parent, "-o", f"{kind}.log",
                *(["--track-mem"] if track else []), *extra]  # fmt: skip
        run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if run.returncode == 0:
            server.wait(timeout=60)  # done once the dump closed its connection
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if run.returncode:
        raise RuntimeError(f"criu {kind}: {_log_tail(src / f'{kind}.log')}")
    return src, dst


def _version(criu: str) -> str:
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return " ".join(out.split()[:2]) or "?"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until something listens on the port (read from /proc/net/tcp: a probe
    connection would be taken by the page server as the dump's)."""
    deadline = time.monotonic() + timeout
    while not any(
        line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"criu page-server is not listening on port {port}")
        time.sleep(0.05)


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-800:]
    except OSError:
        return "(no log)"


def _raw_ssh_seconds(server, blob: Path, size: int) -> float:
    """Time `ssh HOST cat > /dev/null` carrying `size` bytes of incompressible data."""
    with open(blob, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    ssh = ["ssh", *server.ssh_options, server.host]
    started = time.monotonic()
    subprocess.run([*ssh, "true"], check=True, timeout=60)
    setup = time.monotonic() - started  # the migration's stream starts on an open link
    with open(blob, "rb") as f:
        started = time.monotonic()
        subprocess.run([*ssh, "cat > /dev/null"], stdin=f, check=True, timeout=3600)
        seconds = time.monotonic() - started - setup
    blob.unlink()
    return seconds


def render(r: dict, title: str = "5. Live migration over ssh (local sshd)") -> str:
    head = f"### {title}"
    if "error" in r:
        return f"{head}\n\nFailed: {r['error']}"
    rows = [
        f"| {i['number']} | {i['kind']} | {i['pages_written']} | {i['bytes_streamed'] / 1e6:.1f} "
        f"| {i['send_ms']:.0f} | {i['stream_ms']:.0f} | {i['rate_mb_s']:.0f} "
        f"| {i['frozen_ms']:.1f} |"
        for i in r["iterations"]
    ]
    return "\n".join([
        head, "",
        f"{r['target_mb']} MiB writer, {r['rate_pct']}% of pages written per second; "
        f"stopped by rule {r['stop_rule']}.", "",
        "| iter | kind | pages | MB sent | send ms | until committed ms | MB/s | frozen ms |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"- downtime (final dump start to running at the destination): "
        f"**{r['downtime_ms']:.0f} ms**, of which the restore {r['restore_ms']:.0f} ms and "
        f"the final dump's freeze {r['frozen_ms']:.0f} ms",
        f"- stream rate {r['stream_mb_s']:.0f} MB/s vs raw `ssh cat > /dev/null` with the "
        f"same bytes {r['raw_ssh_mb_s']:.0f} MB/s (median of 3): "
        f"**{r['stream_mb_s'] / r['raw_ssh_mb_s']:.2f}** (goal >= 0.8)",
        f"- bytes sent {r['bytes_streamed'] / 1e6:.0f} MB for {r['raw_page_bytes'] / 1e6:.0f} MB "
        f"of pages copied: **{r['bytes_vs_raw_pages']:.2f}** of an uncompressed page stream "
        f"(goal vs CRIU <= 0.5)",
        *_render_criu(r),
    ])  # fmt: skip


def _render_criu(r: dict) -> list[str]:
    c = r.get("criu") or {"error": "not run"}
    if "error" in c:
        return [f"- native CRIU: failed: {c['error']}"]
    ours, theirs = median(r["downtimes_ms"]), median(r["criu_downtimes_ms"])
    runs = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    how = (
        f"{r['criu_pre_dumps']} x `pre-dump --track-mem --page-server`, then "
        if r.get("criu_pre_dumps")
        else "no pre-dump (it needs soft-dirty): "
    )
    return [
        f"- CRIU ({r.get('criu_version', '?')}), same writer: {how}"
        f"`dump --page-server` to a local `criu page-server` (plain TCP), the other "
        f"images copied, `restore -d`: downtime **{c['downtime_ms']:.0f} ms** (dump "
        f"{c['dump_ms']:.0f}, of which frozen {c['frozen_ms']:.0f}; copy {c['copy_ms']:.0f}; "
        f"restore {c['restore_ms']:.0f}); pages sent {c['page_bytes'] / 1e6:.0f} MB",
        f"- downtime of each run, alternating: checkpointer {runs(r['downtimes_ms'])} ms; "
        f"CRIU {runs(r['criu_downtimes_ms'])} ms",
        f"- downtime checkpointer / CRIU (medians): **{ours / theirs:.2f}** (goal <= 0.5); "
        f"bytes sent checkpointer / CRIU: "
        f"**{r['bytes_streamed'] / c['page_bytes']:.2f}** (goal <= 0.5)",
    ]
