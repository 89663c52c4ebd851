"""Start and drive the C test target (tests/targets/target.c) as a real process."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "targets" / "target.c"
FILL = SOURCE.with_name("fill.h")  # included by target.c
PAGE = os.sysconf("SC_PAGE_SIZE")


def target_binary(source: Path = SOURCE) -> Path:
    """Compile a C target once per source version; the binary is cached in /tmp."""
    digest = hashlib.sha256(source.read_bytes() + FILL.read_bytes()).hexdigest()[:16]
    binary = Path(tempfile.gettempdir()) / f"checkpointer-{source.stem}-{digest}"
    if not binary.exists():
        tmp = binary.with_suffix(f".{os.getpid()}")
        subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", str(tmp), str(source)], check=True)
        tmp.rename(binary)
    return binary


@dataclass
class Target:
    proc: subprocess.Popen
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    child: int | None = None
    # "STATE name values..." lines (--state): what the target set, for comparison
    set_state: dict[str, list[str]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, line: str) -> list[str]:
        """Send a command on stdin; return the lines printed before DONE."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = []
        while (reply := self.proc.stdout.readline().strip()) != "DONE":
            if not reply:
                raise RuntimeError(f"target exited during {line!r}")
            out.append(reply)
            self._parse(reply)
        return out

    def _parse(self, line: str) -> None:
        parts = line.split()
        if parts[0] == "REGION":
            self.regions[parts[1]] = (int(parts[2], 16), int(parts[3]))
        elif parts[0] == "CHILD":
            self.child = int(parts[1])
        elif parts[0] == "STATE":
            self.set_state[parts[1]] = parts[2:]

    def wait_ready(self, timeout: float = 30, lines=None) -> None:
        """Read the REGION lines up to READY (at start, and again after `exec`),
        from the target's stdout pipe or from `lines`."""
        if lines is None:
            assert self.proc.stdout
            lines = iter(self.proc.stdout.readline, "")
        deadline = time.monotonic() + timeout
        for raw in lines:
            line = raw.strip()
            if line.startswith("READY"):
                return
            if line:
                self._parse(line)
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"target did not become ready (exit status {self.proc.poll()})")

    def read_mem(self, addr: int, size: int, pid: int | None = None) -> bytes:
        with open(f"/proc/{pid or self.pid}/mem", "rb", buffering=0) as mem:
            return os.pread(mem.fileno(), size, addr)

    def heartbeat(self) -> int:
        """The counter the target's checker thread bumps every millisecond."""
        addr, _ = self.regions["heartbeat"]
        return int.from_bytes(self.read_mem(addr, 8), "little")

    def assert_carries_on(self, timeout: float = 5.0) -> None:
        """The target runs (its heartbeat moves) and its static region is intact
        (its checker thread exits 3 otherwise)."""
        before = self.heartbeat()
        deadline = time.monotonic() + timeout
        while self.heartbeat() == before:
            assert time.monotonic() < deadline, "target did not carry on"
            time.sleep(0.01)

    def state(self, pid: int | None = None) -> str:
        return proc_status(pid or self.pid).get("State", "gone")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        for pid in filter(None, [self.child, self.pid]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:  # and what it forked (`forker`'s children, stopped by a final dump)
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


def start_target(*args: str, timeout: float = 30, output: Path | None = None) -> Target:
    """Start the C target and wait for READY. With `output`, its stdout goes to that
    file and stdin is /dev/null (no pipes to us: a tree restore can bring it back;
    `command` is then unavailable), in a session of its own."""
    if output is not None:
        with open(output, "w") as out:  # the child's own open file: its own offset
            proc = subprocess.Popen(
                [str(target_binary()), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        lines = _follow(open(output), proc, timeout)
    else:
        proc = subprocess.Popen(
            [str(target_binary()), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Its own session: a tree in its caller's session is a shell job, which a
            # final dump refuses without --shell-job (as CRIU does).
            start_new_session=True,
        )
        assert proc.stdout
        lines = iter(proc.stdout.readline, "")
    target = Target(proc)
    try:
        target.wait_ready(timeout, lines)
    except RuntimeError:
        target.kill()
        raise
    return target


def _follow(f, proc: subprocess.Popen, timeout: float):
    """The lines of a file another process is writing, until it exits or time is up."""
    deadline = time.monotonic() + timeout
    pending = ""
    with f:
        while time.monotonic() < deadline and proc.poll() is None:
            pending += f.read()
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                yield line
            time.sleep(0.01)


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def wait_for_state(pid: int, letters: str, timeout: float = 5.0) -> str:
    """Wait until /proc/PID/status State starts with one of `letters`."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = proc_status(pid).get("State", "gone")
        if state[:1] in letters:
            return state
        time.sleep(0.01)
    return state


# Every tracker, marked with the kernel feature it needs (skipped where absent).
TRACKERS = [
    pytest.param("soft-dirty", marks=pytest.mark.softdirty),
    pytest.param("uffd-wp", marks=pytest.mark.uffd_wp),
    pytest.param("full"),
]


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    """A failed CLI run: exit 1, one `checkpointer: ...` line on stderr, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpointer: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


CLI = [sys.executable, "-m", "checkpointer"]


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the checkpointer CLI; the timeout only turns a hang into a failure."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)


# The dumper called the way the tests use it: no progress bar; a final dump tracks
# (so it can extend the chain) and leaves the tree stopped for a memory comparison.
def predump(pid: int, path, parent: str | None = None, tracker: str = "auto"):
    from checkpointer.dump import DumpRequest, pre_dump

    return pre_dump(
        DumpRequest(
            pid=pid, images_dir=path, prev_images_dir=parent, tracker=tracker, progress=False
        )
    )


def final_dump(pid: int, path, parent: str | None, tracker: str, thaw=None):
    from checkpointer.dump import DumpRequest, dump
    from checkpointer.freezer import Thaw

    return dump(
        DumpRequest(
            pid=pid,
            images_dir=path,
            prev_images_dir=parent,
            tracker=tracker,
            track_mem=True,
            thaw=Thaw.STOPPED if thaw is None else thaw,
            progress=False,
        )
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing holds now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
