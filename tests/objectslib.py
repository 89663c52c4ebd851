"""Small Python programs as restore targets for pipes and sockets, and what
dumps, restores and talks to them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from targetlib import assert_one_line_error, cli

# Every program gets these: D (its directory), ready(), go() and report(name, value).
PRELUDE = """
import os, socket, sys, time
from pathlib import Path
D = Path(sys.argv[1])

def ready():
    (D / "ready.tmp").write_text(str(os.getpid()))
    (D / "ready.tmp").rename(D / "ready")

def go():
    while not (D / "go").exists():
        time.sleep(0.01)

def report(name, value):
    (D / (name + ".tmp")).write_bytes(value if isinstance(value, bytes) else repr(value).encode())
    (D / (name + ".tmp")).rename(D / name)
"""


@dataclass
class Program:
    dir: Path
    popen: subprocess.Popen | None

    @property
    def pid(self) -> int:
        return int((self.dir / "ready").read_text())

    def go(self) -> None:
        (self.dir / "go").touch()

    def result(self, name: str, timeout: float = 10.0) -> bytes:
        path = self.dir / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"no {name} from the program"
            time.sleep(0.02)
        return path.read_bytes()

    def reap(self) -> None:
        if self.popen is not None:
            self.popen.wait(timeout=10)
            self.popen = None

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except (ProcessLookupError, FileNotFoundError, ValueError):
            pass
        if self.popen is not None:
            self.popen.kill()
        self.reap()


def start_program(base: Path, code: str, name: str = "prog", **popen) -> Program:
    """Run `code` (after PRELUDE) as python3, detached unless `popen` says otherwise;
    returns once it called ready()."""
    work = base / name
    work.mkdir()
    script = work / "program.py"
    script.write_text(PRELUDE + textwrap.dedent(code))
    opts = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # fmt: skip
    opts.update(popen)
    p = subprocess.Popen([sys.executable, str(script), str(work)], **opts)
    prog = Program(work, p)
    deadline = time.monotonic() + 10
    while not (work / "ready").exists():
        assert p.poll() is None, f"the program exited: {p.returncode}"
        assert time.monotonic() < deadline, "the program did not start"
        time.sleep(0.01)
    return prog


@contextmanager
def program_starter(base: Path, prelude: str = ""):
    """start(code, name, **popen) -> Program (`prelude` before each program's code);
    every program started is killed at the end."""
    started: list[Program] = []

    def start(code: str, name: str = "prog", **popen) -> Program:
        prog = start_program(base, prelude + textwrap.dedent(code), name, **popen)
        started.append(prog)
        return prog

    try:
        yield start
    finally:
        for prog in started:
            prog.kill()


def sigkill(*pids: int) -> None:
    """SIGKILL each, gone or not (a test's clean-up)."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def refused_at_dump(prog: Program, base: Path, *words: str, extra=()) -> None:
    """A dump of the program fails with one line naming it and `words`, writes no
    images, and leaves it running: after go() it must report("alive", 1)."""
    r = cli("dump", "-t", str(prog.pid), "-D", str(base / "images"), *extra)
    assert_one_line_error(r, f"process {prog.pid}", *words)
    assert not (base / "images").exists()
    prog.go()
    assert prog.result("alive") == b"1"  # left running


def dump_and_kill(pid: int, images: Path, *extra: str, reap=None) -> subprocess.CompletedProcess:
    r = cli("dump", "-t", str(pid), "-D", str(images), *extra)
    assert r.returncode == 0, r.stderr
    if reap is not None:
        reap()
    return r


def restore(images: Path) -> None:
    r = cli("restore", "-D", str(images), "-d")
    assert r.returncode == 0, r.stderr
