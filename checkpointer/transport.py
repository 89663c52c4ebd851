"""The sending side of an image stream session, over ssh or a TCP page server.

The image stream (checkpointer/images/stream.py) flows to the destination; the
destination answers with one JSON object per line (receive.py):
hello, committed, prepared, restored, migrated, end, error.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shlex
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Sequence

from checkpointer.errors import CheckpointError
from checkpointer.images.stream import COMMIT, END, PREPARE, RESTORE, StreamSender

REPLY_TIMEOUT = 600.0  # seconds to wait for an answer (a commit fsyncs a whole dump)
MAX_REPLY_LINE = 1 << 20


class LinkError(CheckpointError):
    """The link to the destination failed, or the destination reported an error."""


class Link:
    """A byte pipe out and a line pipe back, with the failure made one line."""

    description = "destination"

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self._out = out_fd
        self._in = in_fd
        self._buf = b""
        self._eof = False

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        try:
            while mv:
                n = os.write(self._out, mv)
                mv = mv[n:]
        except OSError as e:
            raise LinkError(self._lost(f"write failed: {e.strerror}")) from None

    def read_event(self, timeout: float = REPLY_TIMEOUT) -> dict:
        """The next JSON line from the destination; LinkError on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self._eof:
                raise LinkError(self._lost("closed the connection"))
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise LinkError(f"{self.description}: no answer within {timeout:.0f} s")
            try:
                chunk = os.read(self._in, 65536)
            except OSError as e:
                raise LinkError(self._lost(f"read failed: {e.strerror}")) from None
            self._eof = not chunk
            self._buf += chunk
            if len(self._buf) > MAX_REPLY_LINE:
                raise LinkError(f"{self.description}: answer line too long")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            event = json.loads(line)
        except ValueError:
            raise LinkError(
                f"{self.description}: not a checkpointer receiver "
                f"(it said {line[:80].decode(errors='replace')!r})"
            ) from None
        if not isinstance(event, dict) or "event" not in event:
            raise LinkError(f"{self.description}: malformed answer")
        if event["event"] == "error":
            raise LinkError(f"{self.description}: {event.get('message', 'failed')}")
        return event

    def _lost(self, what: str) -> str:
        """Why the link broke: an error the destination sent before it went, if any."""
        try:
            if not self._eof and select.select([self._in], [], [], 1.0)[0]:
                self._buf += os.read(self._in, 65536)
        except OSError:
            pass
        for line in self._buf.split(b"\n"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "error":
                return f"{self.description}: {event.get('message')}"
        return f"{self.description}: link lost ({what}){self.detail()}"

    def detail(self) -> str:
        return ""

    def close(self) -> None:
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass


class SshLink(Link):
    """`ssh [OPTIONS] HOST REMOTE-COMMAND receive -D DIR`, the stream on its stdin."""

    def __init__(
        self,
        host: str,
        remote_dir: str,
        ssh_options: Sequence[str] = (),
        remote_command: str = "checkpointer",
        ssh: str = "ssh",
    ) -> None:
        self.description = host
        command = f"{remote_command} receive -D {shlex.quote(remote_dir)}"
        # The user's options first: for ssh the first value given wins. A link that
        # dies silently is noticed within ~30 s (and the source rolled back).
        argv = [ssh, *ssh_options, "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10",
                "-o", "ServerAliveCountMax=3", "--", host, command]  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a ^C of ours is handled by us, not by ssh
            )
        except OSError as e:
            raise LinkError(f"cannot run {ssh}: {e.strerror}") from None
        widen_pipe(self.proc.stdin.fileno())
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()
        super().__init__(self.proc.stdin.fileno(), self.proc.stdout.fileno())

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr = (self._stderr + [line])[-5:]

    def detail(self) -> str:
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        self._reader.join(timeout=1)
        text = b" ".join(s.strip() for s in self._stderr).decode(errors="replace")
        return f"; ssh exited {self.proc.returncode}" + (f": {text[-300:]}" if text else "")

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TcpLink(Link):
    """A plain TCP connection to `checkpointer page-server` (unauthenticated)."""

    def __init__(self, address: str, port: int, timeout: float = 10.0) -> None:
        self.description = f"page server {address}:{port}"
        try:
            self.sock = socket.create_connection((address, port), timeout=timeout)
        except OSError as e:
            raise LinkError(f"{self.description}: cannot connect: {e.strerror or e}") from None
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive(self.sock)
        fd = self.sock.fileno()
        super().__init__(fd, fd)

    def close(self) -> None:
        self.sock.close()


def widen_pipe(fd: int) -> None:
    """1 MiB of pipe buffer instead of 64 KiB: a quarter as many wake-ups per MB
    between us and ssh. Best effort (the limit is /proc/sys/fs/pipe-max-size)."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass


def keepalive(sock: socket.socket) -> None:
    """Notice a peer that vanished without a word within about 30 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def parse_page_server(value: str) -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 as [ADDR]:PORT) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CheckpointError(f"--page-server {value!r}: want ADDRESS:PORT")
    return host.strip("[]"), int(port)


class Destination:
    """One session with a receiver: dumps, then perhaps a restore."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.hello = link.read_event()
        if self.hello.get("event") != "hello" or self.hello.get("version") != 1:
            raise LinkError(f"{link.description}: unexpected greeting {self.hello!r}")
        self.stream = StreamSender(link.write)

    def send_dump(self, path: str, name: str | None = None) -> dict:
        """Stream the committed dump at path; return once the destination committed it.
        The answer gains `bytes_streamed`, `send_seconds` (until the last byte left)
        and `seconds` (until committed there)."""
        started = time.monotonic()
        before = self.stream.bytes_sent
        self.stream.send_dump(path, name)
        sent = time.monotonic()
        event = self._expect("committed")
        event["bytes_streamed"] = self.stream.bytes_sent - before
        event["send_seconds"] = sent - started  # the link's part
        event["seconds"] = time.monotonic() - started  # and the destination's fsync
        return event

    def prepare(self, name: str) -> dict:
        """Ask the destination to rebuild dump `name`'s memory in a template, so that
        the final restore writes only what changed since; its answer (`ok` False:
        no template, which is no error)."""
        self.stream.control(PREPARE, {"name": name})
        return self._expect("prepared")

    def restore(self, name: str, leave_stopped: bool = False) -> dict:
        """Ask the destination to restore dump `name`; its answer once it runs
        (or is stopped, with leave_stopped)."""
        self.stream.control(RESTORE, {"name": name, "leave_stopped": leave_stopped})
        return self._expect("restored")

    def commit(self) -> dict:
        """Tell the destination the migration stands: it keeps what it restored."""
        self.stream.control(COMMIT)
        return self._expect("migrated")

    def end(self) -> None:
        self.stream.control(END)
        self._expect("end")

    def _expect(self, what: str) -> dict:
        event = self.link.read_event()
        if event["event"] != what:
            raise LinkError(f"{self.link.description}: expected {what}, got {event['event']}")
        return event

    def close(self) -> None:
        self.link.close()


def connect_page_server(page_server: str) -> Destination:
    """A session with the page server at "HOST:PORT", opened before a dump so that
    a wrong or unreachable address is found out before the target is touched."""
    host, port = parse_page_server(page_server)
    return Destination(TcpLink(host, port))


def push_dump(dest: Destination, path: str) -> dict:
    """Send one committed dump over the page server session `dest`, and end the
    session; its `committed` answer."""
    event = dest.send_dump(path)
    dest.end()
    return event
