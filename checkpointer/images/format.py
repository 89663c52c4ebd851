"""On-disk format: file header, bounded record streams, zstd frames, limits.

Every image file starts with a 16-byte header readable without decompressing::

    0  8  magic  b"CKPTIMG\\0"
    8  2  format version (little endian)
    10 2  file kind code (little endian, FILE_KINDS)
    12 4  reserved, zero

Record files (everything but pages-*) continue with ONE zstd frame holding a
msgpack stream of maps. Page files continue with independent zstd frames of page
bytes, indexed by the pagemap file. See images/README.md for the specification.

Everything here treats input as hostile: reads are bounded whatever a file claims,
and every failure is an ImageError naming the file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct

import msgpack
import zstandard as zstd

from checkpointer.errors import ImageError, UnsupportedVersion

MAGIC = b"CKPTIMG\0"
FORMAT_VERSION = 2  # what the writer writes
READ_VERSIONS = (1, 2)  # what the readers accept (v2 = v1 plus the restore fields)
HEADER = struct.Struct("<8sHHI")
HEADER_SIZE = HEADER.size  # 16

# kind name -> code; file names are "<kind>" or "<kind>-<suffix>"
FILE_KINDS = {
    "inventory": 1,
    "pstree": 2,
    "core": 3,
    "mm": 4,
    "fds": 5,
    "pagemap": 6,
    "pages": 7,
    "stats": 8,
}
KIND_BY_CODE = {v: k for k, v in FILE_KINDS.items()}

# ---- limits (memory stays bounded whatever an image claims) ----
MAX_WINDOW = 1 << 23  # zstd window accepted when decompressing (8 MiB)
MAX_RECORD_FILE = 64 << 20  # decompressed bytes of one record file
MAX_PAGEMAP_FILE = 256 << 20  # decompressed bytes of one pagemap file
MAX_RECORDS = 1 << 20  # records in one record file
MAX_PAGEMAP_RECORDS = 1 << 23  # records in one pagemap (streamed into arrays)
MAX_FRAMES = 1 << 20  # zstd frames in one pages file
MAX_FRAME_SIZE = 16 << 20  # uncompressed page frame size
MIN_FRAME_SIZE = 4096
DEFAULT_FRAME_SIZE = 1 << 20
MAX_CHAIN = 256  # dumps in one parent chain
READ_CHUNK = 1 << 16

UNPACK_LIMITS = dict(
    max_buffer_size=16 << 20,
    max_str_len=1 << 20,
    max_bin_len=16 << 20,
    max_array_len=1 << 20,
    max_map_len=1 << 16,
    max_ext_len=0,
)


# page owners: a process's private memory, or a shared object (device, inode)
OWNER_RE = re.compile(r"(pid-[1-9][0-9]{0,9}|shm-[0-9A-Za-z:._]{1,32}-[0-9]{1,20})\Z")

# A writer (writer.py, stream.py) fills the hidden directory `.NAME.tmp-XXXXXXXX`
# and renames it to NAME, its single commit point. Its inventory is written before
# the rename: a run killed just before it leaves a directory that holds a whole
# dump, which the name alone tells from one committed. No dump is ever opened, or
# written, under such a name.
TEMP_DIR_RE = re.compile(r"\.(?s:.+)\.tmp-[A-Za-z0-9_]+\Z")


def temp_dir_prefix(name: str) -> str:
    """The prefix of the temporary directories a writer of dump `name` fills. A
    long name is cut to 200 bytes: with the prefix's dots and mkdtemp's 8
    letters, any name a file system takes (NAME_MAX, 255) fits."""
    return f".{os.fsdecode(os.fsencode(name)[:200])}.tmp-"


def is_temp_dir_name(name: str) -> bool:
    """Is `name` (a directory's base name) that of a writer's temporary directory?"""
    return TEMP_DIR_RE.match(name) is not None


def kind_of_name(name: str) -> str | None:
    """The file kind a file name announces, or None."""
    base = name.split("-", 1)[0]
    return base if base in FILE_KINDS else None


def pack_header(kind: str) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, FILE_KINDS[kind], 0)


def parse_header(data: bytes, where: str, expect: str | None = None) -> tuple[str, int]:
    """Check a 16-byte header; return (kind, version)."""
    if len(data) < HEADER_SIZE:
        raise ImageError("truncated header (file shorter than 16 bytes)", where)
    magic, version, code, reserved = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError("not a checkpointer image (bad magic)", where)
    if version not in READ_VERSIONS:
        raise unsupported_version(version, where)
    kind = KIND_BY_CODE.get(code)
    if kind is None:
        raise ImageError(f"unknown file kind code {code}", where)
    if reserved != 0:
        raise ImageError("reserved header bytes are not zero", where)
    if expect is not None and kind != expect:
        raise ImageError(f"expected a {expect} file, found {kind}", where)
    return kind, version


def unsupported_version(version: object, where: str) -> UnsupportedVersion:
    readable = " and ".join(str(v) for v in READ_VERSIONS)
    return UnsupportedVersion(
        f"unsupported image format version {version} (this checkpointer reads {readable})",
        where,
    )


def read_header(path: str, expect: str | None = None) -> tuple[str, int]:
    with open_image(path) as f:
        return parse_header(f.read(HEADER_SIZE), path, expect)


def open_image(path: str):
    """An image file opened for reading: a regular file, named by the path itself.
    Opened without blocking and without following a final symbolic link, so that a
    FIFO or device put in a dump does not hang its reader and a link cannot lead
    it elsewhere (verify refuses both by name too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError("missing", path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("is a symbolic link, expected an image file", path) from None
        raise ImageError(e.strerror or str(e), path) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError("is a directory, expected an image file", path)
        if not stat.S_ISREG(mode):
            raise ImageError("is not a regular file, expected an image file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def decompressor() -> zstd.ZstdDecompressor:
    return zstd.ZstdDecompressor(max_window_size=MAX_WINDOW)


def encode_records(kind: str, records: list, level: int = 3) -> bytes:
    """Header + one zstd frame holding the msgpack stream of records."""
    packer = msgpack.Packer(use_bin_type=True)
    body = b"".join(packer.pack(r) for r in records)
    check_writable(kind, len(records), len(body))
    cctx = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return pack_header(kind) + cctx.compress(body)


def check_writable(kind: str, count: int, size: int) -> None:
    """Refuse to write a record file the readers would refuse."""
    big = kind == "pagemap"
    if count > (MAX_PAGEMAP_RECORDS if big else MAX_RECORDS) or size > (
        MAX_PAGEMAP_FILE if big else MAX_RECORD_FILE
    ):
        raise ImageError(f"{kind} file too large ({count} records, {size} bytes)")


def iter_records(
    path: str, expect: str | None = None, limit: int | None = None, version: int | None = None
):
    """Yield the records of a record file, bounded in memory and count.

    The limits (decompressed bytes, record count) are larger for pagemap files.
    `version`: the format version the file's header must carry (its dump's).
    """
    with open_image(path) as f:
        kind, found = parse_header(f.read(HEADER_SIZE), path, expect)
        if version is not None and found != version:
            raise ImageError(
                f"file is format version {found}, its dump's inventory says {version}", path
            )
        if kind == "pages":
            raise ImageError("a pages file holds page frames, not records", path)
        big = kind == "pagemap"
        if limit is None:
            limit = MAX_PAGEMAP_FILE if big else MAX_RECORD_FILE
        content_size = _record_frame_size(f.fileno(), path, limit)
        yield from _unpack_records(f, path, limit, content_size, big)


def _record_frame_size(fd: int, path: str, limit: int) -> int:
    """The content size of a record file's one frame, after checking that the frame
    is whole, the file's last bytes, and carries its content size and checksum.

    zstd's stream reader ends quietly where the input ends, so a frame cut short
    (its checksum gone with the end of the file) would otherwise decode unchecked.
    """
    size = os.fstat(fd).st_size
    if size <= HEADER_SIZE:
        raise ImageError("no compressed content after the header", path)
    frame = _walk_one(_pread_fd(fd), path, HEADER_SIZE, size)
    if HEADER_SIZE + frame["clen"] != size:
        raise ImageError("trailing data after the zstd frame", path)
    if not frame["checksum"]:
        raise ImageError("zstd frame has no content checksum", path)
    if frame["content_size"] is None:
        raise ImageError("zstd frame has no content size", path)
    if frame["content_size"] > limit:
        raise ImageError(f"decompressed content exceeds the {limit} byte limit", path)
    return frame["content_size"]


def _unpack_records(f, path: str, limit: int, content_size: int, big: bool):
    """The msgpack records of the frame after the header of the open file f."""
    max_records = MAX_PAGEMAP_RECORDS if big else MAX_RECORDS
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, **UNPACK_LIMITS)
    total = 0
    count = 0
    last_end = 0
    try:
        reader = decompressor().stream_reader(f, read_across_frames=False)
        while True:
            chunk = reader.read(READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ImageError(f"decompressed content exceeds the {limit} byte limit", path)
            unpacker.feed(chunk)
            for rec in unpacker:
                last_end = unpacker.tell()
                count += 1
                if count > max_records:
                    raise ImageError(f"more than {max_records} records", path)
                yield rec
        if total == 0:
            raise ImageError("no compressed content after the header", path)
    except ImageError:
        raise
    except zstd.ZstdError as e:
        raise ImageError(f"corrupt compressed data ({_short(e)})", path) from None
    except Exception as e:  # msgpack and unicode errors on hostile bytes
        raise ImageError(f"corrupt record stream ({type(e).__name__}: {_short(e)})", path) from None
    if total != content_size:
        raise ImageError(f"zstd frame holds {total} bytes, its header says {content_size}", path)
    if last_end != total:  # a partial record is left over
        raise ImageError("truncated record at end of stream", path)


def read_records(
    path: str, expect: str | None = None, limit: int | None = None, version: int | None = None
) -> list:
    return list(iter_records(path, expect, limit, version))


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:200]


# ---- page frames ----


def read_frame(f, path: str, off: int, clen: int, rlen: int, dctx=None) -> bytes:
    """Decompress one indexed page frame, bounded to rlen bytes, checksum checked."""
    data = os.pread(f.fileno(), clen, off)
    if len(data) != clen:
        raise ImageError(f"truncated page frame at offset {off}", path)
    _check_page_frame(data, path, off)
    try:
        reader = (dctx or decompressor()).stream_reader(data, read_across_frames=False)
        out = reader.read(rlen)
        parts = [out]
        got = len(out)
        while got < rlen:
            more = reader.read(rlen - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        if got != rlen:
            raise ImageError(
                f"page frame at offset {off} holds {got} bytes, index says {rlen}", path
            )
        if reader.read(1):
            raise ImageError(f"page frame at offset {off} holds more than {rlen} bytes", path)
    except ImageError:
        raise
    except zstd.ZstdError as e:
        raise ImageError(f"corrupt page frame at offset {off} ({_short(e)})", path) from None
    return out if len(parts) == 1 else b"".join(parts)


def _check_page_frame(data: bytes, path: str, off: int) -> None:
    """Refuse a page frame that is not exactly one whole frame with its checksum:
    zstd's stream reader ends quietly where a cut frame's bytes end, unchecked."""
    frame = _walk_one(_pread_bytes(data, off), path, off, off + len(data))
    if frame["clen"] != len(data):
        raise ImageError(
            f"page frame at offset {off} is {frame['clen']} bytes, its index says {len(data)}",
            path,
        )
    if not frame["checksum"]:
        raise ImageError(f"page frame at offset {off} has no content checksum", path)


def _pread_fd(fd: int):
    return lambda n, pos: os.pread(fd, n, pos)


def _pread_bytes(data: bytes, base: int):
    """pread over data, which sits at file offset base."""
    return lambda n, pos: data[pos - base : pos - base + n]


def walk_frames(path: str, limit: int = MAX_FRAMES) -> list[dict]:
    """List the zstd frames of a pages file by walking frame and block headers.

    Reads only headers (never decompresses): offset, compressed size, content size,
    checksum flag. Independent of the pagemap index, so decode can show it.
    """
    frames = []
    with open_image(path) as f:
        parse_header(f.read(HEADER_SIZE), path, "pages")
        fd = f.fileno()
        size = os.fstat(fd).st_size
        off = HEADER_SIZE
        while off < size:
            if len(frames) >= limit:
                raise ImageError(f"more than {limit} page frames", path)
            frames.append(_walk_one(_pread_fd(fd), path, off, size))
            off += frames[-1]["clen"]
    return frames


def _walk_one(pread, path: str, off: int, size: int) -> dict:
    """The frame at off (headers only): pread(n, pos) reads the file, size ends it."""
    head = pread(18, off)
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        raise ImageError(f"no zstd frame at offset {off}", path)
    fhd = head[4]
    fcs_flag = fhd >> 6
    single = (fhd >> 5) & 1
    checksum = (fhd >> 2) & 1
    did_size = (0, 1, 2, 4)[fhd & 3]
    if fhd & 0x08:
        raise ImageError(f"zstd frame at offset {off} has reserved bit set", path)
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    pos = 5 + (0 if single else 1) + did_size
    if len(head) < pos + fcs_size:
        raise ImageError(f"truncated zstd frame header at offset {off}", path)
    content = None
    if fcs_size:
        content = int.from_bytes(head[pos : pos + fcs_size], "little")
        if fcs_size == 2:
            content += 256
    p = off + pos + fcs_size
    while True:
        bh = pread(3, p)
        if len(bh) < 3:
            raise ImageError(f"truncated zstd block in frame at offset {off}", path)
        v = int.from_bytes(bh, "little")
        last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
        if btype == 3:
            raise ImageError(f"invalid zstd block type in frame at offset {off}", path)
        p += 3 + (1 if btype == 1 else bsize)
        if p > size:
            raise ImageError(f"truncated zstd block in frame at offset {off}", path)
        if last:
            break
    if checksum:
        p += 4
        if p > size:
            raise ImageError(f"truncated zstd checksum in frame at offset {off}", path)
    return {"off": off, "clen": p - off, "content_size": content, "checksum": bool(checksum)}
