"""The image stream: dump directories as one checksummed byte stream.

`checkpointer receive` (over ssh) and `checkpointer page-server` (over TCP) read it
and write normal dump directories. The specification is the "Image stream" section
of images/README.md. In short::

    header   16 bytes: magic b"CKPTSTRM", version u16 LE (1), flags u16 (0), reserved u32 (0)
    message  type u8, length u32 LE, payload (length bytes), crc u32 LE

Each message's crc is zlib.crc32 of its type, length and payload, seeded with the
previous message's crc (the first is seeded with the crc of the header), so a
flipped, dropped, repeated or reordered byte anywhere fails the next check.

A dump travels as DUMP_BEGIN, then for each of its files FILE_BEGIN, FILE_DATA...,
FILE_END (carrying the file's size), the inventory last, then DUMP_END.
The receiver writes into a hidden temporary directory and renames it into place
only after every check passed and DUMP_END arrived (DumpReceiver below).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator

import msgpack

from checkpointer.errors import ImageError
from checkpointer.images import format as fmt
from checkpointer.images.pagewriter import fsync_dir, fsync_files, write_all

STREAM_MAGIC = b"CKPTSTRM"
STREAM_VERSION = 1
STREAM_HEADER = struct.Struct("<8sHHI")
MSG_HEAD = struct.Struct("<BI")
MSG_CRC = struct.Struct("<I")

DUMP_BEGIN, FILE_BEGIN, FILE_DATA, FILE_END, DUMP_END = 1, 2, 3, 4, 5
RESTORE, COMMIT, END, ABORT, PREPARE = 6, 7, 8, 9, 10
MESSAGE_NAMES = {
    DUMP_BEGIN: "dump-begin",
    FILE_BEGIN: "file-begin",
    FILE_DATA: "file-data",
    FILE_END: "file-end",
    DUMP_END: "dump-end",
    RESTORE: "restore",
    COMMIT: "commit",
    END: "end",
    ABORT: "abort",
    PREPARE: "prepare",
}
DATA_CHUNK = 1 << 20  # what a sender puts in one FILE_DATA
MAX_DATA = 4 << 20  # the most a receiver accepts in one FILE_DATA
MAX_CONTROL = 64 << 10  # the most a receiver accepts in any other message
MAX_FILES = 1 << 16  # files in one dump
DUMP_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}\Z")
PID_FILE_RE = re.compile(r"(core|mm|fds)-[1-9][0-9]{0,9}\Z")


def is_image_file_name(name: str) -> bool:
    """A name that may appear in a dump directory (images/README.md)."""
    if name in ("inventory", "pstree", "stats") or PID_FILE_RE.match(name):
        return True
    kind, _, owner = name.partition("-")
    return kind in ("pagemap", "pages") and bool(fmt.OWNER_RE.match(owner))


# ---- encoding ----


class StreamSender:
    """Encode messages onto `write` (a callable taking bytes); counts what it sent."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        header = STREAM_HEADER.pack(STREAM_MAGIC, STREAM_VERSION, 0, 0)
        self._crc = zlib.crc32(header)
        self.bytes_sent = 0
        self._send_raw(header)

    def _send_raw(self, data: bytes | memoryview) -> None:
        self._write(data)
        self.bytes_sent += len(data)

    def message(self, kind: int, payload: bytes | memoryview = b"") -> None:
        head = MSG_HEAD.pack(kind, len(payload))
        self._crc = zlib.crc32(payload, zlib.crc32(head, self._crc))
        if len(payload) < 4096:
            self._send_raw(head + bytes(payload) + MSG_CRC.pack(self._crc))
        else:  # page data: no copy of the payload
            self._send_raw(head)
            self._send_raw(payload)
            self._send_raw(MSG_CRC.pack(self._crc))

    def control(self, kind: int, fields: dict | None = None) -> None:
        self.message(kind, msgpack.packb(fields or {}, use_bin_type=True))

    def send_dump(self, path: str, name: str | None = None) -> int:
        """Send the committed dump at path as `name` (default: its basename).
        Returns the bytes of file content sent."""
        from checkpointer.images.reader import Dump

        name = name or os.path.basename(os.path.normpath(path))
        with Dump.open(path) as d:  # only a complete dump is sent
            kind, parent = d.inventory["kind"], d.inventory["parent"]
        files = sorted(n for n in os.listdir(path) if n != "inventory") + ["inventory"]
        self.control(DUMP_BEGIN, {"name": name, "kind": kind, "parent": parent})
        total = 0
        buf = bytearray(DATA_CHUNK)
        for fname in files:
            self.control(FILE_BEGIN, {"name": fname})
            size = 0
            with open(os.path.join(path, fname), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    size += n
                    self.message(FILE_DATA, memoryview(buf)[:n])
            self.control(FILE_END, {"size": size})
            total += size
        self.control(DUMP_END, {"files": len(files), "bytes": total})
        return total


# ---- decoding ----


def read_messages(
    read: Callable[[int], bytes], where: str = "stream"
) -> Iterator[tuple[int, bytes]]:
    """Yield (type, payload) of each message, checking the header, every length and
    the chained crc. `read(n)` returns up to n bytes, b"" at end of input. Ends
    after END; raises ImageError on anything else, including end of input."""
    header = _read_exact(read, STREAM_HEADER.size, where, "the stream header")
    magic, version, flags, reserved = STREAM_HEADER.unpack(header)
    if magic != STREAM_MAGIC:
        raise ImageError("not a checkpointer image stream (bad magic)", where)
    if version != STREAM_VERSION:
        raise ImageError(
            f"unsupported image stream version {version} (this checkpointer reads "
            f"{STREAM_VERSION})",
            where,
        )
    if flags or reserved:
        raise ImageError("reserved stream header bytes are not zero", where)
    crc = zlib.crc32(header)
    count = 0
    while True:
        head = _read_exact(read, MSG_HEAD.size, where, f"message {count}")
        kind, length = MSG_HEAD.unpack(head)
        if kind not in MESSAGE_NAMES:
            raise ImageError(f"message {count} has unknown type {kind}", where)
        if length > (MAX_DATA if kind == FILE_DATA else MAX_CONTROL):
            raise ImageError(f"message {count} ({MESSAGE_NAMES[kind]}) is too long", where)
        payload = _read_exact(read, length, where, f"message {count}")
        (got,) = MSG_CRC.unpack(_read_exact(read, MSG_CRC.size, where, f"message {count}"))
        crc = zlib.crc32(payload, zlib.crc32(head, crc))
        if got != crc:
            raise ImageError(f"checksum mismatch in message {count} (corrupted stream)", where)
        count += 1
        yield kind, payload
        if kind == END:
            return


def _read_exact(read: Callable[[int], bytes], n: int, where: str, what: str) -> bytes:
    parts = []
    while n:
        chunk = read(n)
        if not chunk:
            raise ImageError(f"stream truncated in {what}", where)
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def decode_control(payload: bytes, where: str = "stream") -> dict:
    try:
        limits = {k: v for k, v in fmt.UNPACK_LIMITS.items() if k != "max_buffer_size"}
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True, **limits)
    except Exception as e:
        raise ImageError(f"bad control message ({type(e).__name__})", where) from None
    if not isinstance(value, dict):
        raise ImageError("control message is not a map", where)
    return value


# ---- receiving ----


class DumpReceiver:
    """Write the dumps of a stream into root_dir, each atomically.

    Files go into a hidden `.NAME.tmp-XXXXXXXX` directory beside NAME; the
    inventory (which marks a dump complete) is kept in memory and written only when
    DUMP_END arrived and every file's size and crc matched; then the directory is
    fsynced, opened as a Dump (the parent must already be here) and renamed to
    NAME. `abort()` removes the temporary directory; `discard_committed()` also
    removes every dump this receiver committed (a migration rolled back).
    """

    def __init__(self, root_dir: str) -> None:
        self.root = os.path.abspath(root_dir)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.committed: list[str] = []
        self.bytes_received = 0
        self._tmp: str | None = None
        self._name = ""
        self._files: dict[str, int] = {}
        self._file: tuple[str, int] | None = None  # name, fd (-1 for inventory)
        self._file_size = 0
        self._inventory: bytearray | None = None

    @property
    def receiving(self) -> bool:
        """A dump is begun and not yet ended."""
        return self._tmp is not None

    def handle(self, kind: int, payload: bytes) -> str | None:
        """Apply one image message; returns the path of a dump it committed."""
        if kind == FILE_DATA:
            self._data(payload)
            return None
        fields = decode_control(payload, self._where())
        if kind == DUMP_BEGIN:
            self._begin(fields)
        elif kind == FILE_BEGIN:
            self._file_begin(fields)
        elif kind == FILE_END:
            self._file_end(fields)
        elif kind == DUMP_END:
            return self._end(fields)
        elif kind == ABORT:
            self.abort()
        else:
            raise ImageError(f"unexpected {MESSAGE_NAMES[kind]} message", self._where())
        return None

    def _where(self) -> str:
        return os.path.join(self.root, self._name) if self._name else self.root

    def _begin(self, fields: dict) -> None:
        if self._tmp:
            raise ImageError("dump-begin inside a dump", self._where())
        name = fields.get("name")
        if not isinstance(name, str) or not DUMP_NAME_RE.match(name):
            raise ImageError(f"bad dump name {name!r} in the stream", self.root)
        self._name = name
        final = os.path.join(self.root, name)
        if os.path.lexists(final) and (not os.path.isdir(final) or os.listdir(final)):
            raise ImageError("already exists; refusing to overwrite", final)
        self._tmp = tempfile.mkdtemp(prefix=fmt.temp_dir_prefix(name), dir=self.root)
        os.chmod(self._tmp, 0o700)
        self._files = {}
        self._inventory = None

    def _file_begin(self, fields: dict) -> None:
        if not self._tmp or self._file:
            raise ImageError("file-begin outside a dump or inside a file", self._where())
        name = fields.get("name")
        if not isinstance(name, str) or not is_image_file_name(name):
            raise ImageError(f"bad image file name {name!r} in the stream", self._where())
        if name in self._files or len(self._files) >= MAX_FILES:
            raise ImageError(f"{name} sent twice or too many files", self._where())
        if name == "inventory":
            self._inventory = bytearray()
            fd = -1
        else:
            fd = os.open(
                os.path.join(self._tmp, name),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            os.fchmod(fd, 0o600)
        self._file = (name, fd)
        self._file_size = 0

    def _data(self, payload: bytes) -> None:
        if not self._file:
            raise ImageError("file data outside a file", self._where())
        name, fd = self._file
        if fd < 0:
            if len(self._inventory) + len(payload) > fmt.MAX_RECORD_FILE:
                raise ImageError("inventory too large", self._where())
            self._inventory += payload
        else:
            write_all(fd, payload)
        self._file_size += len(payload)
        self.bytes_received += len(payload)

    def _file_end(self, fields: dict) -> None:
        if not self._file:
            raise ImageError("file-end outside a file", self._where())
        name, fd = self._file
        self._file = None
        if fd >= 0:
            os.close(fd)
        if fields.get("size") != self._file_size:
            raise ImageError(f"{name}: size differs from the sender's", self._where())
        self._files[name] = self._file_size

    def _end(self, fields: dict) -> str:
        where = self._where()
        if not self._tmp or self._file:
            raise ImageError("dump-end outside a dump or inside a file", where)
        if fields.get("files") != len(self._files) or fields.get("bytes") != sum(
            self._files.values()
        ):
            raise ImageError("file count or size differs from the sender's", where)
        if self._inventory is None:
            raise ImageError("dump ended without an inventory", where)
        from checkpointer.images.pagewriter import write_file
        from checkpointer.images.reader import Dump

        write_file(os.path.join(self._tmp, "inventory"), bytes(self._inventory))
        fsync_files(self._tmp)
        fsync_dir(self._tmp)
        # headers, inventory, pstree, parent present; its own temp dir, not yet a dump
        with Dump.open(self._tmp, committing=True) as d:
            d.parent()
        final = os.path.join(self.root, self._name)
        try:
            if os.path.isdir(final) and not os.path.islink(final):
                os.rename(self._tmp, final)  # replaces an empty directory only
            elif os.path.lexists(final):
                raise ImageError("appeared while receiving; refusing to overwrite", final)
            else:
                os.rename(self._tmp, final)
        except OSError as e:
            raise ImageError(f"cannot rename into place: {e.strerror}", final) from None
        self._tmp = None
        fsync_dir(self.root)
        self.committed.append(final)
        self._name = ""
        return final

    def abort(self) -> None:
        """Drop the dump being received, if any: nothing appears under its name."""
        if self._file and self._file[1] >= 0:
            os.close(self._file[1])
        self._file = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._name = ""

    def discard_committed(self) -> None:
        """Remove the dumps this receiver committed, newest first: the inventory
        goes first so no half-removed directory looks complete."""
        self.abort()
        for path in reversed(self.committed):
            try:
                os.unlink(os.path.join(path, "inventory"))
            except OSError:
                pass
            shutil.rmtree(path, ignore_errors=True)
        self.committed = []
