"""Drive every image reader over possibly hostile input (tests and scripts/fuzz-images).

`exercise_dir(path)` and `exercise_file(path)` call every reading function; the
only exception they may let through is ImageError. Fuzz inputs are "packed dirs":
a msgpack map {relative name: bytes} unpacked by `unpack_case` into a directory.
"""

from __future__ import annotations

import io
import os
import re

import msgpack

from checkpointer.errors import ImageError
from checkpointer.images import inspect, render
from checkpointer.images.reader import Dump

NAME_RE = re.compile(r"([0-9a-z]{1,8}/)?[0-9a-z:._-]{1,40}\Z")


def _swallow(fn, *args):
    try:
        return fn(*args)
    except ImageError as e:
        str(e)  # must render
        if "\n" in str(e):
            raise AssertionError(f"multi-line error message: {e!r}") from None
        return None


def exercise_file(path: str) -> None:
    _swallow(inspect.info, path)
    _swallow(inspect.decode, path)
    _swallow(inspect.show, path)

    def streamed():
        head, items = inspect.decode_stream(path)
        key = "frames" if head["kind"] == "pages" else "entries"
        inspect.write_json_stream(head, items, key, io.StringIO(), pretty=True)
        head, items = inspect.decode_stream(path)
        for _ in render.show_file_lines(head, items):
            pass

    _swallow(streamed)


def exercise_dir(path: str, deep: bool = True) -> None:
    """Every reader over one dump directory (and its chain)."""
    _swallow(inspect.show, path)
    _swallow(inspect.verify, path)
    for view in inspect.X_VIEWS:
        _swallow(inspect.x, path, view)
    d = _swallow(Dump.open, path)
    if d is None:
        return
    with d:
        for pid in d.pids[:4]:
            _swallow(d.core, pid)
            _swallow(d.fds, pid)
            mm = _swallow(d.mm, pid)
            if mm is None or not deep:
                continue
            for v in mm.vmas[:8]:
                size = min(v["end"] - v["start"], 1 << 20)
                _swallow(d.read_memory, pid, v["start"], size)
                _swallow(inspect.extract, path, pid, v["start"], min(size, 8192))
        _swallow(lambda: d.stats)
        for owner in _swallow(d.owners) or []:
            _swallow(lambda o=owner: list(d.page_runs(o)))
    if deep:
        for name in sorted(os.listdir(path))[:64]:
            exercise_file(os.path.join(path, name))


def pack_dir(top: str) -> bytes:
    """Pack a directory of dumps (top/N/files) or one dump (top/files) as a fuzz case."""
    files = {}
    for root, _, names in os.walk(top):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, top)
            with open(p, "rb") as f:
                files[rel] = f.read()
    return msgpack.packb(files, use_bin_type=True)


def unpack_case(data: bytes, into: str) -> str:
    """Write a fuzz case under `into`; return the dump dir to open (the last one)."""
    try:
        files = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, UnicodeDecodeError):
        files = None
    if not isinstance(files, dict):
        files = {"1/inventory": data}
    dirs = set()
    for name, content in list(files.items())[:128]:
        if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
            continue
        if not isinstance(content, bytes):
            continue
        p = os.path.join(into, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(content)
        dirs.add(os.path.dirname(p))
    return max(dirs) if dirs else into
