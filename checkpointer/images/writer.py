"""DumpWriter (atomic temp dir -> final dir) and PageWriter (parallel zstd frames)."""

from __future__ import annotations

import collections
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgpack
import zstandard as zstd

from checkpointer.errors import ImageError
from checkpointer.images import format as fmt
from checkpointer.images import schema

# zstd level for page frames: level -1 measured ~1.7x the throughput of level 1 on
# mixed memory for ~10% less compression (see scripts/bench-images, docs/inspect.md).
PAGE_LEVEL = -1
RECORD_LEVEL = 3
OWNER_RE = re.compile(r"(pid-[1-9][0-9]{0,9}|shm-[0-9A-Za-z:._]{1,32}-[0-9]{1,20})\Z")


class PageStats(NamedTuple):
    written: int
    zero: int
    parent: int
    bytes_raw: int
    bytes_compressed: int


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_tls = threading.local()


def _compress(level: int, buf: bytearray, n: int) -> bytes:
    cctx = getattr(_tls, "cctx", None)
    if cctx is None or _tls.level != level:
        cctx = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        _tls.cctx, _tls.level = cctx, level
    return cctx.compress(memoryview(buf)[:n])


class PageWriter:
    """Page runs of one owner: pages-OWNER (zstd frames) + pagemap-OWNER (index, runs).

    Frames are compressed on the shared pool with at most `max_in_flight` frames
    pending, so memory stays bounded (~ (max_in_flight + 2) * frame_size).
    """

    def __init__(self, dirpath, owner, page_size, frame_size, pool, level, max_in_flight):
        self.owner = owner
        self.page_size = page_size
        self.frame_size = frame_size
        self._dir = dirpath
        self._pool = pool
        self._level = level
        self._max_in_flight = max_in_flight
        self._zero = bytes(page_size)
        self._scratch = bytearray(min(frame_size, 1 << 20))
        self._frame = bytearray(frame_size)
        self._fill = 0
        self._free: list[bytearray] = []
        self._inflight: collections.deque = collections.deque()
        self._frames: list[list[int]] = []  # [off, clen, rlen]
        self._runs: list[list] = []  # [addr, nr, where, off]
        self._pos = 0  # uncompressed stream position
        self._file_off = fmt.HEADER_SIZE
        self._next_addr = 0
        self._counts = {"here": 0, "parent": 0, "zero": 0}
        self.closed = False
        self.stats: PageStats | None = None
        self._fd = os.open(
            os.path.join(dirpath, f"pages-{owner}"),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o600,
        )
        os.fchmod(self._fd, 0o600)
        _write_all(self._fd, fmt.pack_header("pages"))

    # ---- runs ----

    def _check(self, addr: int, nbytes: int) -> None:
        if self.closed:
            raise ValueError(f"pages-{self.owner} is closed")
        ps = self.page_size
        if addr < 0 or addr % ps or nbytes % ps:
            raise ValueError(f"page run {addr:#x}+{nbytes:#x} is not page aligned")
        if addr < self._next_addr:
            raise ValueError(
                f"page run at {addr:#x} overlaps or precedes {self._next_addr:#x} "
                f"(runs must be added in increasing address order)"
            )
        if addr + nbytes > 1 << 64:
            raise ValueError(f"page run {addr:#x}+{nbytes:#x} beyond 64-bit addresses")

    def _add_run(self, addr: int, nr: int, where: str, off: int | None) -> None:
        if nr == 0:
            return
        self._counts[where] += nr
        ps = self.page_size
        if self._runs:
            last = self._runs[-1]
            if (
                last[2] == where
                and last[0] + last[1] * ps == addr
                and (where != "here" or last[3] + last[1] * ps == off)
            ):
                last[1] += nr
                self._next_addr = addr + nr * ps
                return
        self._runs.append([addr, nr, where, off])
        self._next_addr = addr + nr * ps

    def add_parent(self, addr: int, nr_pages: int) -> None:
        self._check(addr, nr_pages * self.page_size)
        self._add_run(addr, nr_pages, "parent", None)

    def add_zero(self, addr: int, nr_pages: int) -> None:
        self._check(addr, nr_pages * self.page_size)
        self._add_run(addr, nr_pages, "zero", None)

    def add_data(self, addr: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self._check(addr, n)
        ps = self.page_size
        scratch = self._scratch
        zero = self._zero
        step = len(scratch)
        for base in range(0, n, step):
            c = min(step, n - base)
            scratch[:c] = mv[base : base + c]
            a0 = addr + base
            run_start = 0
            run_zero = scratch[0:ps] == zero
            for j in range(ps, c, ps):
                z = scratch[j : j + ps] == zero
                if z != run_zero:
                    self._emit(a0, scratch, run_start, j, run_zero)
                    run_start, run_zero = j, z
            self._emit(a0, scratch, run_start, c, run_zero)

    def _emit(self, a0, scratch, lo, hi, is_zero):
        nr = (hi - lo) // self.page_size
        if is_zero:
            self._add_run(a0 + lo, nr, "zero", None)
            return
        self._add_run(a0 + lo, nr, "here", self._pos)
        self._append(memoryview(scratch)[lo:hi])

    # ---- frames ----

    def _append(self, data: memoryview) -> None:
        fs = self.frame_size
        while data:
            take = min(fs - self._fill, len(data))
            self._frame[self._fill : self._fill + take] = data[:take]
            self._fill += take
            self._pos += take
            data = data[take:]
            if self._fill == fs:
                self._submit()

    def _submit(self) -> None:
        if not self._fill:
            return
        buf, n = self._frame, self._fill
        fut = self._pool.submit(_compress, self._level, buf, n)
        self._inflight.append((fut, buf, n))
        self._frame = self._free.pop() if self._free else bytearray(self.frame_size)
        self._fill = 0
        while len(self._inflight) >= self._max_in_flight:
            self._drain_one()

    def _drain_one(self) -> None:
        fut, buf, n = self._inflight.popleft()
        data = fut.result()
        _write_all(self._fd, data)
        self._frames.append([self._file_off, len(data), n])
        self._file_off += len(data)
        self._free.append(buf)

    def close(self) -> PageStats:
        if self.closed:
            return self.stats
        self._submit()
        while self._inflight:
            self._drain_one()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.closed = True
        ps = self.page_size
        compressed = self._file_off - fmt.HEADER_SIZE
        head = {
            "owner": self.owner,
            "page_size": ps,
            "frame_size": self.frame_size,
            "nr_frames": len(self._frames),
            "nr_runs": len(self._runs),
            "pages_here": self._counts["here"],
            "pages_parent": self._counts["parent"],
            "pages_zero": self._counts["zero"],
            "bytes_raw": self._counts["here"] * ps,
            "bytes_compressed": compressed,
        }
        packer = msgpack.Packer(use_bin_type=True)
        parts = [packer.pack(head)]
        parts += [packer.pack({"off": o, "clen": c, "rlen": r}) for o, c, r in self._frames]
        parts += [
            packer.pack({"addr": a, "nr": nr, "where": w, "off": off})
            for a, nr, w, off in self._runs
        ]
        cctx = zstd.ZstdCompressor(level=RECORD_LEVEL, write_checksum=True, write_content_size=True)
        data = fmt.pack_header("pagemap") + cctx.compress(b"".join(parts))
        _write_file(os.path.join(self._dir, f"pagemap-{self.owner}"), data)
        self.stats = PageStats(
            self._counts["here"], self._counts["zero"], self._counts["parent"],
            self._counts["here"] * ps, compressed,
        )  # fmt: skip
        self._frame = self._scratch = bytearray()
        self._free.clear()
        return self.stats

    def _abort(self) -> None:
        for fut, _, _ in self._inflight:
            fut.cancel()
        self._inflight.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.closed = True


class DumpWriter:
    """Write one dump directory atomically. See docs/architecture.md."""

    def __init__(
        self,
        final_dir: str,
        kind: str = "dump",
        parent: str | None = None,
        *,
        page_size: int | None = None,
        frame_size: int = fmt.DEFAULT_FRAME_SIZE,
        level: int = PAGE_LEVEL,
        workers: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if kind not in ("dump", "pre-dump"):
            raise ValueError(f"kind must be 'dump' or 'pre-dump', not {kind!r}")
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        if (
            frame_size % self.page_size
            or not fmt.MIN_FRAME_SIZE <= frame_size <= fmt.MAX_FRAME_SIZE
        ):
            raise ValueError(f"frame_size {frame_size} must be a page multiple up to 16 MiB")
        self.final_dir = os.path.abspath(final_dir)
        self.kind = kind
        self.parent = parent
        self.frame_size = frame_size
        self.level = level
        self._pages: dict[str, PageWriter] = {}
        self._written: set[str] = set()
        self._pstree: list[dict] | None = None
        self._done = False
        self.tmp_dir: str | None = None
        self._final_mode = 0o700
        self._replace_empty = False

        where = self.final_dir
        name = os.path.basename(self.final_dir)
        if not name or name in (".", ".."):
            raise ImageError("not a usable dump directory name", where)
        container = os.path.dirname(self.final_dir)
        self._make_container(container)
        self._check_final()
        if parent is not None:
            self._check_parent(parent)

        self.tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=container)
        os.chmod(self.tmp_dir, 0o700)
        workers = workers or min(4, os.cpu_count() or 1)
        self._max_in_flight = max_in_flight or 2 * workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="zstd")

    # ---- setup checks ----

    @staticmethod
    def _make_container(container: str) -> None:
        missing = []
        d = container
        while not os.path.isdir(d):
            if os.path.lexists(d):
                raise ImageError("exists and is not a directory", d)
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)

    def _check_final(self) -> None:
        from checkpointer.images.reader import is_complete_dump

        where = self.final_dir
        if not os.path.lexists(where):
            return
        if os.path.islink(where) or not os.path.isdir(where):
            raise ImageError("exists and is not a directory", where)
        if os.listdir(where):
            if is_complete_dump(where):
                raise ImageError("already holds a complete dump; refusing to overwrite", where)
            raise ImageError("exists and is not empty; refusing to overwrite", where)
        st = os.stat(where)
        self._final_mode = 0o700 & st.st_mode
        self._replace_empty = True

    def _check_parent(self, parent: str) -> None:
        from checkpointer.images.reader import Dump

        if not isinstance(parent, str) or not parent or os.path.isabs(parent):
            raise ImageError(f"parent link {parent!r} must be a relative path", self.final_dir)
        target = os.path.normpath(os.path.join(self.final_dir, parent))
        p = Dump.open(target)  # ImageError if missing or incomplete
        if not p.inventory.get("usable_as_parent", True):
            raise ImageError("marked as not usable as a parent", target)
        if p.inventory["page_size"] != self.page_size:
            raise ImageError("parent has a different page size", target)

    # ---- context manager ----

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary directory; nothing appears at final_dir."""
        self._done = True
        for pw in self._pages.values():
            pw._abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.tmp_dir and os.path.isdir(self.tmp_dir):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # ---- records ----

    def _write_records(self, name: str, kind: str, records: list) -> None:
        if self._done:
            raise ValueError("dump writer already committed or aborted")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        data = fmt.encode_records(kind, records, RECORD_LEVEL)
        _write_file(os.path.join(self.tmp_dir, name), data)
        self._written.add(name)

    def _checked(self, kind: str, rec, what: str) -> dict:
        schema.check(kind, rec, self.final_dir, what)
        return rec

    def write_pstree(self, procs: list[dict]) -> None:
        procs = [self._checked("pstree", p, f"pstree[{i}]") for i, p in enumerate(procs)]
        self._pstree = procs
        self._write_records("pstree", "pstree", procs)

    def write_core(self, pid: int, process: dict, threads: list[dict]) -> None:
        recs = [self._checked("process", process, f"core-{pid}")]
        recs += [self._checked("thread", t, f"core-{pid}.thread[{i}]") for i, t in enumerate(threads)]
        self._write_records(f"core-{int(pid)}", "core", recs)

    def write_mm(self, pid: int, mm: dict, vmas: list[dict]) -> None:
        recs = [self._checked("mm", mm, f"mm-{pid}")]
        recs += [self._checked("vma", v, f"mm-{pid}.vma[{i}]") for i, v in enumerate(vmas)]
        self._write_records(f"mm-{int(pid)}", "mm", recs)

    def write_fds(self, pid: int, fds: list[dict]) -> None:
        recs = [self._checked("fd", f, f"fds-{pid}[{i}]") for i, f in enumerate(fds)]
        self._write_records(f"fds-{int(pid)}", "fds", recs)

    def write_stats(self, stats: dict) -> None:
        self._write_records("stats", "stats", [self._checked("stats", stats, "stats")])

    def open_pages(self, owner: str) -> PageWriter:
        if self._done:
            raise ValueError("dump writer already committed or aborted")
        if not isinstance(owner, str) or not OWNER_RE.match(owner):
            raise ValueError(f"bad page owner {owner!r} (want pid-N or shm-DEV-INODE)")
        if owner in self._pages:
            raise ValueError(f"pages of {owner} opened twice")
        pw = PageWriter(
            self.tmp_dir, owner, self.page_size, self.frame_size, self._pool, self.level,
            self._max_in_flight,
        )  # fmt: skip
        self._pages[owner] = pw
        return pw

    # ---- commit ----

    def commit(self, inventory_fields: dict | None = None) -> str:
        """Write the inventory, fsync, rename the temp dir to final_dir. Returns final_dir."""
        if self._done:
            raise ValueError("dump writer already committed or aborted")
        for pw in self._pages.values():
            pw.close()
        if "pstree" not in self._written:
            raise ValueError("commit before write_pstree")
        from checkpointer import __version__

        pids = [p["pid"] for p in self._pstree]
        inv = {
            "tool_version": __version__,
            "tracker": "full",
            "kernel": os.uname().release,
            "created": time.time(),
            "root_pid": pids[0] if pids else 0,
            "pids": pids,
            "start_times": {},
            "tracking": {},
            "usable_as_parent": True,
        }
        inv.update(inventory_fields or {})
        inv.update(
            format_version=fmt.FORMAT_VERSION,
            kind=self.kind,
            parent=self.parent,
            page_size=self.page_size,
            complete=True,
        )
        schema.check("inventory", inv, self.final_dir)
        self._write_records("inventory", "inventory", [inv])
        self._pool.shutdown(wait=True)
        _fsync_dir(self.tmp_dir)
        os.chmod(self.tmp_dir, self._final_mode)
        try:
            if self._replace_empty:
                os.rename(self.tmp_dir, self.final_dir)  # atomically replaces an empty dir
            else:
                # never replace something that appeared meanwhile
                if os.path.lexists(self.final_dir):
                    raise ImageError("appeared while writing; refusing to overwrite", self.final_dir)
                os.rename(self.tmp_dir, self.final_dir)
        except OSError as e:
            raise ImageError(f"cannot rename into place: {e.strerror}", self.final_dir) from None
        self._done = True
        self.tmp_dir = None
        _fsync_dir(os.path.dirname(self.final_dir))
        return self.final_dir
