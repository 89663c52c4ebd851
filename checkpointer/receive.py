"""The receiving side: `checkpointer receive` (stdin/stdout, under ssh) and
`checkpointer page-server` (TCP).

A session reads one image stream and answers one JSON line per event:

    hello      {version, boot_id, pid_ns, images_dir, prepare} at once
    committed  {name, path, bytes}                         after each DUMP_END
    prepared   {name, ok, seconds, message?}               PREPARE done (or not)
    restored   {name, root_pid, pids}                      RESTORE done, tree running
    migrated   {}                                          COMMIT: we keep the tree
    end        {}                                          END
    error      {message}                                   then the session ends

PREPARE (a migration, after each pre-dump) rebuilds the dump's memory in a
template process (restore/template.py), so that the final RESTORE writes only
what changed since. A template that cannot be made is no error: the restore
then writes every page, as without it.

A session that ends any other way than END (an error, end of input, a signal)
undoes itself: it kills a tree it restored unless COMMIT arrived, and removes the
dumps it committed unless COMMIT arrived or it was a page-server session that asked
for no restore (plain `--page-server` dumps), so no complete-looking chain of a
failed migration is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checkpointer.errors import CheckpointError, ImageError
from checkpointer.images.stream import (
    COMMIT,
    END,
    PREPARE,
    RESTORE,
    DumpReceiver,
    decode_control,
    read_messages,
)
from checkpointer.transport import keepalive, widen_pipe

log = logging.getLogger("checkpointer")


def host_identity() -> dict:
    """What tells two ends whether they share one PID space, and whether this end
    can restore at all."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    return {
        "boot_id": boot_id,
        "pid_ns": os.readlink("/proc/self/ns/pid"),
        "can_restore": can_restore(),
    }


def can_restore() -> bool:
    try:
        import checkpointer.restore  # noqa: F401
    except ImportError:
        return False
    return True


# After a restore, how long the source may take to confirm the migration. Past it,
# the source is presumed to have rolled back (it resumes its tree when it hears
# nothing), so the restored tree is killed rather than left to run twice.
COMMIT_TIMEOUT = 60.0


@dataclass
class Session:
    images_dir: str
    reply: Callable[[dict], None]
    keep_dumps_on_failure: bool = False  # page server: each dump stands alone
    receiver: DumpReceiver = field(init=False)
    restored_pids: list[int] = field(default_factory=list)
    restore_asked: bool = False  # a migration: its dumps go if it fails, page server too
    migrated: bool = False
    template: object = None  # restore.template.Template of the newest prepared dump

    def __post_init__(self) -> None:
        self.receiver = DumpReceiver(self.images_dir)

    def reader(self, fd: int, recv: Callable[[int], bytes]) -> Callable[[int], bytes]:
        """recv, bounded in time while a restored tree waits for the source's commit."""

        def read(n: int) -> bytes:
            if self.restored_pids and not self.migrated:
                if not select.select([fd], [], [], COMMIT_TIMEOUT)[0]:
                    raise CheckpointError(
                        f"no word from the source within {COMMIT_TIMEOUT:.0f} s of the restore"
                    )
            return recv(min(n, 1 << 20))

        return read

    def run(self, read: Callable[[int], bytes]) -> None:
        """Serve one stream to its END; on any failure undo and re-raise."""
        try:
            self.reply(
                {
                    "event": "hello",
                    "version": 1,
                    "images_dir": self.receiver.root,
                    "prepare": can_restore(),
                    **host_identity(),
                }
            )
            for kind, payload in read_messages(read):
                if kind == RESTORE:
                    self._restore(decode_control(payload))
                elif kind == PREPARE:
                    self._prepare(decode_control(payload))
                elif kind == COMMIT:
                    self.migrated = True
                    self.reply({"event": "migrated"})
                elif kind == END:
                    if self.receiver.receiving:
                        raise ImageError("stream ended inside a dump")
                    self.reply({"event": "end"})
                elif path := self.receiver.handle(kind, payload):
                    log.info("committed %s", path)
                    self.reply(
                        {
                            "event": "committed",
                            "name": os.path.basename(path),
                            "path": path,
                            "bytes": self.receiver.bytes_received,
                        }
                    )
        except BaseException as err:
            self._undo()
            if isinstance(err, (CheckpointError, OSError)):
                self._try_reply({"event": "error", "message": _one_line(err)})
            raise
        finally:
            self._drop_template()

    def _committed_path(self, name, what: str) -> str:
        path = next((p for p in self.receiver.committed if os.path.basename(p) == name), None)
        if path is None:
            raise ImageError(f"{what} of {name!r}, which this session did not receive")
        return path

    def _prepare(self, fields: dict) -> None:
        name = fields.get("name")
        path = self._committed_path(name, "prepare")
        started = time.monotonic()
        answer = {"event": "prepared", "name": name, "ok": True}
        try:
            from checkpointer.restore import template
            from checkpointer.restore.restorer import MALFORMED

            self.template = template.build(path, self.template)
        except (ImportError, CheckpointError, OSError, *MALFORMED) as err:
            log.debug("no template of %s", name, exc_info=True)
            why = _one_line(err)
            log.warning("no template of %s (the restore will write every page): %s", name, why)
            answer.update(ok=False, message=why)
        self.reply({**answer, "seconds": time.monotonic() - started})

    def _drop_template(self) -> None:
        if self.template is not None:
            self.template.kill()
            self.template = None

    def _restore(self, fields: dict) -> None:
        self.restore_asked = True
        name = fields.get("name")
        path = self._committed_path(name, "restore")
        try:
            from checkpointer.restore import RestoreRequest, restore
        except ImportError:
            raise CheckpointError("this checkpointer has no restore") from None
        from pathlib import Path

        started = time.monotonic()
        leave_stopped = bool(fields.get("leave_stopped", False))
        template, self.template = self.template, None  # the restore consumes it
        try:
            res = restore(
                RestoreRequest(
                    images_dir=Path(path),
                    detach=True,
                    leave_stopped=leave_stopped,
                    template=template,
                )
            )
        except BaseException:
            if template is not None:
                template.kill()
            raise
        self.restored_pids = list(res.pids)
        self.reply(
            {
                "event": "restored",
                "name": name,
                "root_pid": res.root_pid,
                "pids": list(res.pids),
                "seconds": time.monotonic() - started,
                "bytes_written": res.bytes_written,
            }
        )
        if template is not None:
            template.kill()  # reaped once the tree runs and the source knows it

    def _undo(self) -> None:
        if self.migrated:
            self.receiver.abort()
            return
        for pid in self.restored_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.restored_pids:
            log.warning(
                "killed the restored tree %s: the migration did not commit", self.restored_pids
            )
        self.restored_pids = []
        if self.keep_dumps_on_failure and not self.restore_asked:
            self.receiver.abort()
        else:
            self.receiver.discard_committed()

    def _try_reply(self, event: dict) -> None:
        try:
            self.reply(event)
        except OSError:
            pass


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, CheckpointError):
        what = err.strerror or str(err)
        return f"{err.filename}: {what}" if err.filename else what
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _line_writer(fd: int) -> Callable[[dict], None]:
    def reply(event: dict) -> None:
        data = (json.dumps(event) + "\n").encode()
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv) :]

    return reply


def receive_stdio(images_dir: str) -> Session:
    """`checkpointer receive`: the stream on stdin, answers on stdout."""
    widen_pipe(0)
    session = Session(images_dir, _line_writer(1))
    session.run(session.reader(0, lambda n: os.read(0, n)))
    return session


def _check_writable(images_dir: str) -> None:
    """images_dir is (or is made) a directory a dump can be written into."""
    DumpReceiver(images_dir)  # makes it, 0700
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=images_dir)
    os.close(fd)
    os.unlink(probe)


def serve_tcp(
    address: str,
    port: int,
    images_dir: str,
    once: bool = False,
    on_listening: Callable[[tuple], None] | None = None,
) -> None:
    """`checkpointer page-server`: one session per connection, one at a time.
    A failed session is logged and the server goes on (unless `once`)."""
    _check_writable(images_dir)  # now, not when the first client comes
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((address, port))
        except OSError as e:
            raise CheckpointError(f"cannot listen on {address}:{port}: {e.strerror}") from None
        server.listen(1)
        if on_listening:
            on_listening(server.getsockname())
        while True:
            conn, peer = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                session = Session(
                    images_dir, _line_writer(conn.fileno()), keep_dumps_on_failure=True
                )
                keepalive(conn)
                try:
                    session.run(session.reader(conn.fileno(), conn.recv))
                    log.info(
                        "session from %s:%s done: %s",
                        peer[0],
                        peer[1],
                        [os.path.basename(p) for p in session.receiver.committed],
                    )
                except (CheckpointError, OSError) as err:
                    log.warning("session from %s:%s failed: %s", peer[0], peer[1], _one_line(err))
                    if once:
                        raise
            if once:
                return
