"""Benchmark section `restore`: dump a workload (killing it), then restore it and
time that, for each size, with checkpointer and (in the guest) CRIU side by side
on the same workload and the same boot."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
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


# A server and its forked workers: the parent fills MB MiB with random bytes and
# forks four children that share it; one of them rewrites 1% of it. Each blocks
# on a pipe; "ready" is written once all have forked.
FORKED_TREE = r"""
import os, sys
mb, ready = int(sys.argv[1]), sys.argv[2]
data = bytearray(os.urandom(mb << 20))
for n in range(4):
    if os.fork() == 0:
        if n == 0:
            for off in range(0, len(data), 100 << 12):
                data[off] ^= 1
        os.read(os.pipe()[0], 1)
        os._exit(0)
open(ready + ".tmp", "w").write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
os.read(os.pipe()[0], 1)
"""


def _tree_pids(root: int) -> list[int]:
    return [root] + [int(c) for c in open(f"/proc/{root}/task/{root}/children").read().split()]


def _tree_pss_mb(root: int) -> float:
    kib = 0
    for pid in _tree_pids(root):
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                kib += int(line.split()[1])
    return kib / 1024


def restore_tree(mb: int, criu: str | None, base: str | None) -> dict:
    """Section `restore-tree`: the memory a forked tree needs after a restore
    against before its dump (PSS summed over the tree: 1.0 = as shared as it was),
    the restore's wall time, the dump's (kill) and its images' size; with the
    native CRIU on the same workload."""
    out: dict = {"target_mb": mb}
    for tool in ["checkpointer"] + (["criu"] if criu else []):
        say(f"restore-tree: {mb} MiB and 4 children, {tool}")
        with TempDir("bench-tree-", base) as tmp:
            ready = tmp / "ready"
            prog = subprocess.Popen(
                [sys.executable, "-c", FORKED_TREE, str(mb), str(ready)],
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            images = tmp / "images"
            try:
                deadline = time.monotonic() + 120
                while not ready.exists():
                    assert prog.poll() is None and time.monotonic() < deadline, "no tree"
                    time.sleep(0.05)
                before = _tree_pss_mb(prog.pid)
                tree = _tree_pids(prog.pid)
                if tool == "criu":
                    images.mkdir()
                    dumped = run_timed([criu, "dump", "-t", str(prog.pid), "-D", str(images),
                                        "-o", "dump.log"]).check()  # fmt: skip
                else:
                    dumped = cp("dump", "-t", str(prog.pid), "-D", str(images))
                prog.wait(timeout=60)
                for pid in tree:  # CRIU's killed children are init's to reap
                    _gone(pid)
                _settle()
                if tool == "criu":
                    run = run_timed([criu, "restore", "-d", "-D", str(images),
                                     "-o", "restore.log"]).check()  # fmt: skip
                else:
                    run = cp("restore", "-D", str(images), "-d")
                after = _tree_pss_mb(prog.pid)
                out[tool] = {"pss_before_mb": before, "pss_after_mb": after,
                             "pss_ratio": after / before, "wall_s": run.wall_s,
                             "dump_wall_s": dumped.wall_s,
                             "image_mb": dir_bytes(images) / MiB}  # fmt: skip
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(prog.pid, signal.SIGKILL)
                prog.wait()
    return out
