"""The whole contents of files that live only while open (deleted files, memfds),
read through /proc/PID/fd/N or /proc/PID/map_files/ while the tree is frozen and
written as the pages of their owner (offsets in the file; the last page padded
with zeros: the record keeps the size)."""

from __future__ import annotations

import os

from checkpointer.errors import UnsupportedObject
from checkpointer.images.pagewriter import PageStats
from checkpointer.kernel import proc
from checkpointer.kernel.pagemap import PAGE_SIZE

CHUNK = 1 << 20


def open_source(source: tuple) -> tuple[int, int]:
    """(our fd on the file, its size) for a content_sources() entry."""
    try:
        if source[0] == "fd":
            _, pid, fd, size = source
            return proc.open_fd_file(pid, fd), size
        _, pid, start, end, size = source
        return proc.open_mapped_file(pid, start, end), size
    except PermissionError:
        what = f"fd {source[2]}" if source[0] == "fd" else f"the mapping at {source[2]:#x}"
        raise UnsupportedObject(
            f"process {source[1]}: {what} is a deleted file this user may not read"
        ) from None


def copy_contents(writer, owner: str, source: tuple) -> PageStats:
    fd, size = open_source(source)
    pages = writer.open_pages(owner)
    try:
        for off in range(0, size, CHUNK):
            data = os.pread(fd, min(CHUNK, size - off), off)
            if len(data) != min(CHUNK, size - off):
                raise OSError(f"{owner}: short read at {off} of {size} bytes")
            padded = -(-len(data) // PAGE_SIZE) * PAGE_SIZE
            pages.add_data(off, data + bytes(padded - len(data)))
    finally:
        os.close(fd)
    return pages.close()
