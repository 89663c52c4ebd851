"""Read CRIU's stats-dump image without pycriu: magic words + size-prefixed protobuf.

stats.proto (CRIU 3.17): stats_entry { dump_stats_entry dump = 1; restore = 2; }
dump_stats_entry: freezing_time 1, frozen_time 2, memdump_time 3, memwrite_time 4
(all µs), pages_scanned 5, pages_skipped_parent 6, pages_written 7, irmap_resolve 8,
pages_lazy 9, page_pipes 10, page_pipe_bufs 11, shpages_scanned 12,
shpages_skipped_parent 13, shpages_written 14 (all varints).
"""

from __future__ import annotations

import struct
from pathlib import Path

IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
DUMP_FIELDS = {
    1: "freezing_time",
    2: "frozen_time",
    3: "memdump_time",
    4: "memwrite_time",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    8: "irmap_resolve",
    9: "pages_lazy",
    10: "page_pipes",
    11: "page_pipe_bufs",
    12: "shpages_scanned",
    13: "shpages_skipped_parent",
    14: "shpages_written",
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(msg: bytes):
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
        elif wire == 2:
            n, pos = _varint(msg, pos)
            value, pos = msg[pos : pos + n], pos + n
        elif wire == 1:
            value, pos = msg[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = msg[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not supported")
        yield num, value


def read(path: Path) -> dict[str, int]:
    data = Path(path).read_bytes()
    m0, m1 = struct.unpack_from("<II", data, 0)
    if m0 == IMG_SERVICE_MAGIC and m1 == STATS_MAGIC:
        off = 8
    elif m0 == STATS_MAGIC:
        off = 4
    else:
        raise ValueError(f"{path}: not a CRIU stats image (magic {m0:#x} {m1:#x})")
    (size,) = struct.unpack_from("<I", data, off)
    entry = data[off + 4 : off + 4 + size]
    for num, value in _fields(entry):
        if num == 1:
            return {DUMP_FIELDS.get(n, f"field{n}"): v for n, v in _fields(value)}
    return {}
