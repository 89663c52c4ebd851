"""A workload for restore tests (tests/targets/lifecycle.c) and what checks it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from targetlib import proc_status, target_binary

LIFECYCLE = Path(__file__).parent / "targets" / "lifecycle.c"
MAPPED = bytes((i * 37 + 11) % 251 for i in range(65536))


@dataclass
class Lifecycle:
    dir: Path
    pid: int
    child: int
    popen: subprocess.Popen | None

    def status(self) -> dict[str, int]:
        """The status line; read again while the workload is halfway through
        rewriting it (pwrite, then ftruncate)."""
        for _ in range(100):
            text = (self.dir / "status").read_text()
            try:
                st = {k: int(v) for k, v in (kv.split("=") for kv in text.split())}
            except ValueError:
                st = {}
            if "child_pid" in st:  # the last field: the line is whole
                return st
            time.sleep(0.005)
        raise AssertionError(f"no whole status line: {text!r}")

    def wait_for(self, pred, what: str, timeout: float = 10.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.status()
                if pred(st):
                    return st
            except (ValueError, KeyError, FileNotFoundError):
                st = {}
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status {st}")
            time.sleep(0.02)

    def carries_on(self, timeout: float = 20.0) -> dict[str, int]:
        """Main loop, timer, sleeper, child and checksum all move on from now."""
        before = self.status()
        keys = ("counter", "alarms", "sleeps", "child")
        return self.wait_for(
            lambda st: all(st[k] > before[k] + 3 for k in keys) and st["sum_ok"] == 1,
            "counter, alarms, sleeps and child to move on",
            timeout,
        )

    def log_counters(self) -> list[int]:
        return [int(x) for x in (self.dir / "log").read_text().split()]

    def reap_original(self, timeout: float | None = 10) -> None:
        if self.popen is not None:
            self.popen.wait(timeout=timeout)
            self.popen = None

    def kill(self) -> None:
        for pid in filter(None, (self.child, self.pid)):  # never kill(0): our group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in filter(None, (self.pid, self.child)):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        self.reap_original()


def start_lifecycle(base: Path, anon_mb: int = 16) -> Lifecycle:
    work = base / "work"
    work.mkdir()
    (work / "mapped").write_bytes(MAPPED)
    popen = subprocess.Popen(
        [str(target_binary(LIFECYCLE)), str(work), str(anon_mb)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a session leader: restore must setsid
    )
    lc = Lifecycle(work, popen.pid, 0, popen)
    try:
        st = lc.wait_for(lambda st: st["counter"] > 20 and st["child"] > 5, "the workload to start")
    except BaseException:
        popen.kill()  # the child dies with it: SIGKILL of the parent is not enough
        st = lc.status() if (work / "status").exists() else {}
        if st.get("child_pid"):
            os.kill(st["child_pid"], signal.SIGKILL)
        popen.wait()
        raise
    lc.child = st["child_pid"]
    return lc


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not proc_status(pid).get("State", "").startswith("T"):
        assert time.monotonic() < deadline, f"{pid} did not stop: {proc_status(pid)}"
        time.sleep(0.01)
