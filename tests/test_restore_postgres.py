"""PostgreSQL under pgbench load survives a converge and a restore.

A tree of ten processes (postmaster, its background workers and one backend per
client) holding what a real server holds: a shared anonymous segment of buffers
that every process writes, SysV and POSIX shared memory, the postmaster's
death-watch pipe, unix and TCP listeners, and the clients' TCP connections.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from targetlib import cli, free_port

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _have_postgres() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return bool(BIN) and all(
        os.access(os.path.join(BIN[-1], p), os.X_OK) for p in ("postgres", "initdb", "pgbench")
    )


pytestmark = pytest.mark.skipif(
    not (_have_postgres() and shutil.which("psql")),
    reason="needs PostgreSQL's server (Debian's postgresql) and its user 'postgres'",
)


def _tool(name: str) -> str:
    return os.path.join(BIN[-1], name)


class Postgres:
    """A throwaway cluster of user postgres on 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="checkpointer-pg-", dir="/tmp")
        shutil.chown(self.dir, "postgres")
        self.data = os.path.join(self.dir, "data")
        subprocess.run([_tool("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres"],
                       user="postgres", check=True, capture_output=True, timeout=120)  # fmt: skip
        self.server = subprocess.Popen(
            [_tool("postgres"), "-D", self.data, "-p", str(port), "-k", self.dir,
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            user="postgres", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "log"), "wb"), start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.sql("select 1", check=False).returncode != 0:
            assert time.monotonic() < deadline and self.server.poll() is None, self.log()
            time.sleep(0.2)

    def sql(self, query: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-X", "-At",
             "-v", "ON_ERROR_STOP=1", "-c", query],
            capture_output=True, text=True, timeout=60, check=check,
        )  # fmt: skip

    def value(self, query: str) -> str:
        return self.sql(query).stdout.strip()

    def pgbench(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(
            ["pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", *args,
             "postgres"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
        )  # fmt: skip

    def log(self) -> str:
        with open(os.path.join(self.dir, "log"), errors="replace") as f:
            return f.read()[-2000:]

    def stop(self, pid: int) -> None:
        """Immediate shutdown of the postmaster `pid` (the original or the restored
        one), then its files."""
        try:
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.server.returncode is None:
            self.server.kill()
            self.server.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_postgres_under_pgbench_restored_after_converge():
    """Rows committed before the final dump read back after the restore; the
    pgbench clients, connected across the checkpoint (--tcp-established), go on
    committing and finish without one failed transaction; a new client is served;
    the shared buffers come back shared (a write by one backend is seen by the
    next)."""
    pg = Postgres(free_port())
    pid = pg.server.pid
    bench = None
    try:
        pg.sql("create table kept (i int primary key, s text)")
        pg.sql("insert into kept select g, md5(g::text) from generate_series(1, 20000) g")
        init = pg.pgbench("-i", "-s", "2")
        assert init.wait(timeout=120) == 0, init.stdout.read()
        bench = pg.pgbench("-c", "4", "-T", "25", "-n")
        time.sleep(2)
        r = cli("converge", "-t", str(pid), "-D", str(os.path.join(pg.dir, "images")),
                "--tcp-established", "--max-iterations", "3", timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr
        pg.server.wait(timeout=60)
        r = cli("restore", "-D", os.path.join(pg.dir, "images", "final"), "-d", timeout=600)
        assert r.returncode == 0, r.stderr
        assert _alive(pid)
        assert pg.value("select count(*), sum(length(s)) from kept") == "20000|640000"
        assert pg.value("select s from kept where i = 777") == pg.value("select md5('777')")
        before = int(pg.value("select count(*) from pgbench_history"))
        out, _ = bench.communicate(timeout=120)
        assert bench.returncode == 0, out
        assert "number of failed transactions: 0 " in out, out
        assert int(pg.value("select count(*) from pgbench_history")) > before, out
        # a new backend (forked by the restored postmaster) reads what another wrote
        pg.sql("update kept set s = 'after' where i = 1")
        assert pg.value("select s from kept where i = 1") == "after"
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.communicate()
        pg.stop(pid)
