"""A real OpenSSH server on 127.0.0.1 at a free port, as the "remote host" of the
migration tests: generated host and user keys, nothing leaves the machine."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from targetlib import free_port

SSHD = "/usr/sbin/sshd"
WORKTREE = Path(__file__).resolve().parent.parent


@dataclass
class Sshd:
    proc: subprocess.Popen
    port: int
    key: Path
    host: str = "root@127.0.0.1"

    @property
    def ssh_options(self) -> list[str]:
        return ["-p", str(self.port), "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]  # fmt: skip

    def ssh(self, command: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.ssh_options, self.host, command],
                              capture_output=True, text=True, timeout=60, **kw)  # fmt: skip

    def sessions(self) -> list[int]:
        """The per-connection sshd processes (killing one cuts that link)."""
        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            out += [int(p) for p in (task / "children").read_text().split()]
        return out


def remote_command(*wrapper: str) -> str:
    """How the destination runs this worktree's checkpointer (a shell command),
    optionally behind a wrapper such as tests/streamfault.py."""
    env = f"env PYTHONPATH={shlex.quote(str(WORKTREE))}"
    state = os.environ.get("CHECKPOINTER_STATE_DIR")
    if state:
        env += f" CHECKPOINTER_STATE_DIR={shlex.quote(state + '-remote')}"
    parts = [env, shlex.quote(sys.executable)]
    if wrapper:
        parts += [shlex.quote(str(WORKTREE / "tests" / wrapper[0])), *map(shlex.quote, wrapper[1:]),
                  "--", shlex.quote(sys.executable)]  # fmt: skip
    return " ".join(parts + ["-m", "checkpointer"])


def start_sshd(tmp: Path) -> Sshd:
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("needs openssh-server and openssh-client")
    tmp.mkdir(mode=0o700, exist_ok=True)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)],
                       check=True)  # fmt: skip
    (tmp / "authorized_keys").write_text((tmp / "user_key.pub").read_text())
    os.chmod(tmp / "authorized_keys", 0o600)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile {tmp / 'sshd.pid'}\nLogLevel ERROR\nMaxStartups 50\n"
    )
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    server = Sshd(proc, port, tmp / "user_key")
    deadline = time.monotonic() + 10
    while True:
        r = server.ssh("true")
        if r.returncode == 0:
            return server
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_sshd(server)
            raise RuntimeError(f"sshd did not come up: {r.stderr}")
        time.sleep(0.1)


def stop_sshd(server: Sshd) -> None:
    for pid in server.sessions() if server.proc.poll() is None else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.terminate()
    server.proc.wait(timeout=10)
