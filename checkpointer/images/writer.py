"""DumpWriter: write one dump directory atomically (temp dir -> final dir)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from checkpointer.errors import ImageError
from checkpointer.images import format as fmt
from checkpointer.images import schema
from checkpointer.images.format import OWNER_RE
from checkpointer.images.pagewriter import (
    PAGE_LEVEL,
    RECORD_LEVEL,
    FramePool,
    PageStats,
    PageWriter,
    fsync_dir,
    fsync_files,
    write_file,
)

__all__ = ["DumpWriter", "PageStats", "PageWriter"]


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
        if fmt.is_temp_dir_name(name):
            raise ImageError(
                "is named like a writer's temporary directory, never read as a dump; "
                "choose another name",
                where,
            )
        container = os.path.dirname(self.final_dir)
        self._check_not_inside_a_dump(container)
        self._make_container(container)
        self._check_final()
        if parent is not None:
            self._check_parent(parent)

        self.tmp_dir = tempfile.mkdtemp(prefix=fmt.temp_dir_prefix(name), dir=container)
        os.chmod(self.tmp_dir, 0o700)
        workers = workers or min(4, os.cpu_count() or 1)
        self._max_in_flight = max_in_flight or 2 * workers
        # Every frame a writer can hold at once: in flight, filling, and one spare.
        self._frames = FramePool(frame_size, self._max_in_flight + 2)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="zstd")
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="write")

    # ---- setup checks ----

    @staticmethod
    def _check_not_inside_a_dump(container: str) -> None:
        """A dump's directory holds its files only: another dump inside it (a
        converge's X/1, X/final, or X/sub) would make it fail to verify."""
        from checkpointer.images.reader import is_complete_dump

        d = os.path.abspath(container)
        while True:
            if os.path.isdir(d) and is_complete_dump(d):
                raise ImageError("holds a dump; choose a directory of its own", d)
            up = os.path.dirname(d)
            if up == d:
                return
            d = up

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
        if os.path.islink(where):
            raise ImageError("is a symbolic link; give the directory itself", where)
        if not os.path.isdir(where):
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
        root = os.path.realpath(os.path.dirname(self.final_dir))
        if not os.path.realpath(target).startswith(root + os.sep):
            raise ImageError(
                f"parent link {parent!r} leaves {root}: readers only follow parents "
                "inside the directory holding the dump",
                self.final_dir,
            )
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
        self._write_thread.shutdown(wait=True, cancel_futures=True)
        if self.tmp_dir and os.path.isdir(self.tmp_dir):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if self.tmp_dir and os.path.isdir(self.tmp_dir):
            # Left whole by a writer out of file descriptors (EMFILE): listing a
            # directory takes one, unlinking a name does not. Its files by name.
            names = set(self._written)
            for owner in self._pages:
                names.update((f"pages-{owner}", f"pagemap-{owner}"))
            for name in names:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.tmp_dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.tmp_dir)

    # ---- records ----

    def _write_records(self, name: str, kind: str, records: list) -> None:
        if self._done:
            raise ValueError("dump writer already committed or aborted")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        data = fmt.encode_records(kind, records, RECORD_LEVEL)
        write_file(os.path.join(self.tmp_dir, name), data)
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
        recs += [
            self._checked("thread", t, f"core-{pid}.thread[{i}]") for i, t in enumerate(threads)
        ]
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

    def open_pages(self, owner: str, same_as: str | None = None) -> PageWriter:
        """A writer of owner's pages; `same_as`: the owner its "same" runs refer to."""
        if self._done:
            raise ValueError("dump writer already committed or aborted")
        if not isinstance(owner, str) or not OWNER_RE.match(owner):
            raise ValueError(f"bad page owner {owner!r} (want pid-N or shm-DEV-INODE)")
        if owner in self._pages:
            raise ValueError(f"pages of {owner} opened twice")
        if same_as is not None and (not OWNER_RE.match(same_as) or same_as == owner):
            raise ValueError(f"bad owner {same_as!r} for the pages of {owner} to be the same as")
        pw = PageWriter(
            self.tmp_dir, owner, self.page_size, self.frame_size, self._pool,
            self._write_thread, self.level, self._max_in_flight, same_as, self._frames,
        )  # fmt: skip
        self._pages[owner] = pw
        return pw

    # ---- commit ----

    def sync(self) -> None:
        """Put what is written so far on disk. commit() syncs too; a caller may sync
        earlier, beside other work, so that commit's own sync finds little left."""
        if self._done:
            raise ValueError("dump writer already committed or aborted")
        for pw in self._pages.values():
            pw.close()
        fsync_files(self.tmp_dir)

    def commit(self, inventory_fields: dict | None = None) -> str:
        """Write the inventory, fsync, rename the temp dir to final_dir. Returns final_dir.

        The rename is the commit: until it, the temp dir's name keeps every reader
        from taking it for a dump, complete inventory and all (fmt.TEMP_DIR_RE)."""
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
        self._write_thread.shutdown(wait=True)
        fsync_files(self.tmp_dir)
        fsync_dir(self.tmp_dir)
        os.chmod(self.tmp_dir, self._final_mode)
        try:
            if self._replace_empty:
                os.rename(self.tmp_dir, self.final_dir)  # atomically replaces an empty dir
            else:
                # never replace something that appeared meanwhile
                if os.path.lexists(self.final_dir):
                    raise ImageError(
                        "appeared while writing; refusing to overwrite", self.final_dir
                    )
                os.rename(self.tmp_dir, self.final_dir)
        except OSError as e:
            raise ImageError(f"cannot rename into place: {e.strerror}", self.final_dir) from None
        self._done = True
        self.tmp_dir = None
        fsync_dir(os.path.dirname(self.final_dir))
        return self.final_dir
