"""Dump: open a dump directory, follow its parent chain, read memory, verify.

Every input is untrusted: each problem is an ImageError naming the file or dir.
"""

from __future__ import annotations

import bisect
import os
from array import array
from typing import NamedTuple

from checkpointer.errors import ImageError
from checkpointer.images import format as fmt
from checkpointer.images import schema
from checkpointer.images.format import OWNER_RE
from checkpointer.pageruns import Range, intersect, normalize

WHERE_CODE = {"here": 0, "parent": 1, "zero": 2, "same": 3}
WHERE_NAME = ("here", "parent", "zero", "same")
PRIVATE_ANON = ("anon", "heap", "stack")
MAX_U64 = 1 << 64


class PageRun(NamedTuple):
    addr: int
    nr: int
    where: str  # "here" | "parent" | "zero" | "same"
    off: int | None  # byte offset in the uncompressed page stream (here only)


class Core(NamedTuple):
    process: dict
    threads: list


class Mm(NamedTuple):
    mm: dict
    vmas: list


def is_complete_dump(path: str) -> bool:
    try:
        Dump.open(path)
        return True
    except ImageError:
        return False


class PageMap:
    """A parsed pagemap-OWNER: frame index and runs in compact arrays."""

    def __init__(self, dump: Dump, owner: str):
        self.owner = owner
        self.path = os.path.join(dump.path, f"pagemap-{owner}")
        self.pages_path = os.path.join(dump.path, f"pages-{owner}")
        where = self.path
        ps = dump.page_size
        it = fmt.iter_records(self.path, "pagemap", version=dump.version)
        head = next(it, None)
        if head is None:
            raise ImageError("empty pagemap (no head record)", where)
        schema.check("pagemap_head", head, where, "head", dump.version)
        if head["owner"] != owner:
            raise ImageError(f"head names owner {head['owner']!r}, file is for {owner}", where)
        if head["page_size"] != ps:
            raise ImageError("page size differs from the inventory's", where)
        fs = head["frame_size"]
        if fs % ps or not fmt.MIN_FRAME_SIZE <= fs <= fmt.MAX_FRAME_SIZE:
            raise ImageError(f"bad frame size {fs}", where)
        nr_frames, nr_runs = head["nr_frames"], head["nr_runs"]
        if not (0 <= nr_frames <= fmt.MAX_FRAMES and 0 <= nr_runs <= fmt.MAX_PAGEMAP_RECORDS):
            raise ImageError("absurd frame or run count", where)
        self.head = head
        self.version = dump.version
        self.frame_size = fs
        self.page_size = ps
        self.f_off = array("Q")
        self.f_clen = array("Q")
        self.f_rlen = array("Q")
        file_off = fmt.HEADER_SIZE
        stream = 0
        max_clen = fs + fs // 64 + 4096
        for i in range(nr_frames):
            fr = next(it, None)
            if fr is None:
                raise ImageError(f"index ends after {i} of {nr_frames} frames", where)
            schema.check("frame", fr, where, f"frame[{i}]")
            off, clen, rlen = fr["off"], fr["clen"], fr["rlen"]
            if off != file_off or not 0 < clen <= max_clen:
                raise ImageError(f"frame[{i}] offset/length inconsistent", where)
            if not 0 < rlen <= fs or (rlen != fs and i != nr_frames - 1) or rlen % ps:
                raise ImageError(f"frame[{i}] has a bad uncompressed length {rlen}", where)
            self.f_off.append(off)
            self.f_clen.append(clen)
            self.f_rlen.append(rlen)
            file_off += clen
            stream += rlen
        self.pages_file_size = file_off
        self.stream_size = stream
        self.r_addr = array("Q")
        self.r_nr = array("Q")
        self.r_where = array("B")
        self.r_off = array("q")
        counts = [0, 0, 0, 0]
        next_addr = 0
        next_off = 0
        for i in range(nr_runs):
            r = next(it, None)
            if r is None:
                raise ImageError(f"runs end after {i} of {nr_runs}", where)
            schema.check("run", r, where, f"run[{i}]")
            addr, nr, w, off = r["addr"], r["nr"], WHERE_CODE[r["where"]], r["off"]
            if addr % ps or addr < next_addr or nr <= 0 or addr + nr * ps > MAX_U64:
                raise ImageError(f"run[{i}] at {addr:#x} is misplaced or overlaps", where)
            if w == 0:
                if off != next_off or off + nr * ps > stream:
                    raise ImageError(f"run[{i}] at {addr:#x} points outside the page data", where)
                next_off += nr * ps
            elif off is not None:
                raise ImageError(f"run[{i}] at {addr:#x} has an offset but no data", where)
            next_addr = addr + nr * ps
            counts[w] += nr
            self.r_addr.append(addr)
            self.r_nr.append(nr)
            self.r_where.append(w)
            self.r_off.append(-1 if off is None else off)
        if next(it, None) is not None:
            raise ImageError("records after the last run", where)
        if next_off != stream:
            raise ImageError("page data not covered exactly by runs", where)
        same = head.get("pages_same", 0)
        if counts != [head["pages_here"], head["pages_parent"], head["pages_zero"], same]:
            raise ImageError("page counts in the head do not match the runs", where)
        # Whose pages the "same" runs are: another owner of this dump.
        self.same_as = head.get("same_as") if same else None
        if same and not (
            isinstance(self.same_as, str) and OWNER_RE.match(self.same_as) and self.same_as != owner
        ):
            raise ImageError(f"same runs name no other owner ({self.same_as!r})", where)
        self._file = None
        self._dctx = None  # made at the first frame(): most pagemaps are read by pagefeed
        self._cache: dict[int, bytes] = {}

    def runs(self):
        for i in range(len(self.r_addr)):
            off = self.r_off[i]
            yield PageRun(
                self.r_addr[i], self.r_nr[i], WHERE_NAME[self.r_where[i]], None if off < 0 else off
            )

    def runs_in(self, start: int, end: int):
        """(addr, end, where_code, off) for runs intersecting [start, end), clipped."""
        ps = self.page_size
        i = max(0, bisect.bisect_right(self.r_addr, start) - 1)
        n = len(self.r_addr)
        while i < n:
            a = self.r_addr[i]
            if a >= end:
                break
            b = a + self.r_nr[i] * ps
            if b > start:
                lo, hi = max(a, start), min(b, end)
                off = self.r_off[i]
                yield lo, hi, self.r_where[i], (off + lo - a) if off >= 0 else -1
            i += 1

    def _pages_file(self):
        if self._file is None:
            f = fmt.open_image(self.pages_path)
            _, version = fmt.parse_header(f.read(fmt.HEADER_SIZE), self.pages_path, "pages")
            if version != self.version:
                f.close()
                raise ImageError(
                    f"file is format version {version}, its dump's inventory says {self.version}",
                    self.pages_path,
                )
            size = os.fstat(f.fileno()).st_size
            if size != self.pages_file_size:
                f.close()
                raise ImageError(
                    f"size {size} does not match its index ({self.pages_file_size})",
                    self.pages_path,
                )
            self._file = f
        return self._file

    def frame(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is None:
            f = self._pages_file()
            if self._dctx is None:
                self._dctx = fmt.decompressor()
            data = fmt.read_frame(
                f, self.pages_path, self.f_off[i], self.f_clen[i], self.f_rlen[i], self._dctx
            )
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = data
        return data

    def open_pages(self) -> None:
        """Open (and check) the pages file now, before threads read frames."""
        self._pages_file()

    def frame_uncached(self, i: int, dctx) -> bytes:
        """Frame i decompressed with the caller's own decompressor, bypassing the
        cache: several threads may call it at once (after open_pages())."""
        assert self._file is not None, "open_pages() first"
        return fmt.read_frame(
            self._file, self.pages_path, self.f_off[i], self.f_clen[i], self.f_rlen[i], dctx
        )

    def read_stream(self, off: int, length: int) -> bytes:
        return b"".join(data[o : o + n] for data, o, n in self.stream_views(off, length))

    def stream_views(self, off: int, length: int):
        """(frame, offset, length) pieces of the page stream [off, off + length),
        one per frame it spans, into the decompressed frames themselves: no copy."""
        fs = self.frame_size
        while length > 0:
            i, o = divmod(off, fs)
            data = self.frame(i)
            take = min(length, len(data) - o)
            yield data, o, take
            off += take
            length -= take

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        self._cache.clear()


def _owner_in(record: dict, key: str, where: str) -> str | None:
    """The page owner of a record's optional `key` part (a ghost, a memfd)."""
    if key not in record:
        return None
    part = record[key]
    owner = part.get("owner") if isinstance(part, dict) else None
    if not isinstance(owner, str) or not OWNER_RE.match(owner):
        raise ImageError(f"a {key} record with a bad owner {owner!r}", where)
    return owner


class Dump:
    """One complete dump directory (and, lazily, its parent chain)."""

    def __init__(
        self, path: str, root: str, seen: frozenset, reuse: tuple = (), committing: bool = False
    ):
        self.path = path
        self.real = os.path.realpath(path)  # its identity in a chain
        self._root = root
        self._seen = seen
        self._reuse: tuple[Dump, ...] = reuse  # opened chains a parent link may land in
        self._parent: Dump | None | bool = False
        self._pagemaps: dict[str, PageMap | None] = {}
        self._held: dict[str, list[Range]] = {}
        # pid -> its checked mm and vma records: read_memory is called once per page
        # run when comparing with a parent, and re-reading mm-PID each time is
        # quadratic; a restore reads them once for the process, once for its vdso.
        self._mms: dict[int, Mm] = {}
        inv_path = os.path.join(path, "inventory")
        if not os.path.isdir(path):
            raise ImageError(
                "no such dump directory" if not os.path.lexists(path) else "not a directory", path
            )
        if not os.path.lexists(inv_path):
            raise ImageError(
                "incomplete dump: no inventory (interrupted dump, or not a dump directory)", path
            )
        if not committing and fmt.is_temp_dir_name(os.path.basename(self.real)):
            raise ImageError(
                "incomplete dump: a writer's temporary directory, never renamed into place "
                "(interrupted dump)",
                path,
            )
        _, header_version = fmt.read_header(inv_path, "inventory")
        recs = fmt.read_records(inv_path, "inventory")
        if len(recs) != 1:
            raise ImageError(f"expected 1 inventory record, found {len(recs)}", inv_path)
        inv = recs[0]
        if isinstance(inv, dict):
            v = inv.get("format_version", header_version)
            if v not in fmt.READ_VERSIONS:
                raise fmt.unsupported_version(v, inv_path)
            if v != header_version:
                raise ImageError(
                    f"inventory says format version {v}, its file header {header_version}",
                    inv_path,
                )
        # Every record file of the dump carries this version and its schema.
        self.version: int = header_version
        schema.check("inventory", inv, inv_path, version=self.version)
        if not inv["complete"]:
            raise ImageError("incomplete dump: inventory not marked complete", path)
        ps = inv["page_size"]
        if ps < 4096 or ps > (1 << 21) or ps & (ps - 1):
            raise ImageError(f"bad page size {ps}", inv_path)
        self.inventory = inv
        self.page_size = ps
        pst_path = os.path.join(path, "pstree")
        pstree = fmt.read_records(pst_path, "pstree", version=self.version)
        seen_pids = set()
        for i, p in enumerate(pstree):
            schema.check("pstree", p, pst_path, f"pstree[{i}]", self.version)
            if p["pid"] in seen_pids or p["pid"] <= 0:
                raise ImageError(f"pid {p['pid']} listed twice or invalid", pst_path)
            seen_pids.add(p["pid"])
        self.pstree = pstree
        self.pids = [p["pid"] for p in pstree]

    @classmethod
    def open(cls, path: str, reuse: tuple[Dump, ...] = (), *, committing: bool = False) -> Dump:
        """Open the dump at path (kept as given, for messages); ImageError if unusable.
        `reuse`: dumps opened before whose whole chain was read (chain()); a parent
        link to one of them takes it as it is, its page maps already parsed (a
        migration's final dump, whose parents the destination read for a template).
        `committing`: a writer checks its own temporary directory before renaming
        it into place; nothing else opens one (fmt.TEMP_DIR_RE)."""
        real = os.path.realpath(path)
        return cls(path, os.path.dirname(real), frozenset([real]), reuse, committing)

    # ---- records ----

    def _pid_file(self, kind: str, pid: int) -> str:
        if pid not in self.pids:
            raise ImageError(f"pid {pid} is not in this dump", self.path)
        return os.path.join(self.path, f"{kind}-{pid}")

    def core(self, pid: int) -> Core:
        path = self._pid_file("core", pid)
        recs = fmt.read_records(path, "core", version=self.version)
        if not recs:
            raise ImageError("no process record", path)
        schema.check("process", recs[0], path, "process", self.version)
        for i, t in enumerate(recs[1:]):
            schema.check("thread", t, path, f"thread[{i}]", self.version)
        return Core(recs[0], recs[1:])

    def mm(self, pid: int) -> Mm:
        if pid in self._mms:
            return self._mms[pid]
        path = self._pid_file("mm", pid)
        recs = fmt.read_records(path, "mm", version=self.version)
        if not recs:
            raise ImageError("no mm record", path)
        schema.check("mm", recs[0], path, "mm", self.version)
        prev_end = 0
        for i, v in enumerate(recs[1:]):
            schema.check("vma", v, path, f"vma[{i}]", self.version)
            s, e = v["start"], v["end"]
            if s % self.page_size or e % self.page_size or not prev_end <= s < e <= MAX_U64:
                raise ImageError(
                    f"vma[{i}] {s:#x}-{e:#x} misaligned, unsorted or overlapping", path
                )
            if v["shmem"] is not None and not OWNER_RE.match(v["shmem"]):
                raise ImageError(f"vma[{i}] has a bad shmem owner {v['shmem']!r}", path)
            if v["offset"] < 0:
                raise ImageError(f"vma[{i}] has a negative offset", path)
            prev_end = e
        mm = self._mms[pid] = Mm(recs[0], recs[1:])
        return mm

    @property
    def is_final(self) -> bool:
        """A final dump, not a pre-dump: it holds core-PID, mm-PID and fds-PID for
        every process (verify.FINAL_DUMP_FILES) and the page map of every owner in
        use (owners_in_use); a pre-dump holds memory only."""
        return self.inventory["kind"] == "dump"

    def fds(self, pid: int) -> list:
        """The open files of `pid`; none in a pre-dump, which records no files."""
        path = self._pid_file("fds", pid)
        if not self.is_final and not os.path.lexists(path):
            return []
        recs = fmt.read_records(path, "fds", version=self.version)
        for i, r in enumerate(recs):
            schema.check("fd", r, path, f"fd[{i}]", self.version)
        return recs

    def owners_in_use(self) -> list[str]:
        """The page owners a final dump's processes use: each one's private memory,
        and the memory objects they map or hold open (MAP_SHARED regions, deleted
        files and memfds, whose contents the dump keeps). A final dump has a page
        map for every one, empty or not: an ImageError names one it lacks, whose
        memory a restore would lose."""
        owners = set()
        for pid in self.pids:
            owners.add(f"pid-{pid}")
            where = self._pid_file("mm", pid)
            for v in self.mm(pid).vmas:
                owners.update(o for o in (v["shmem"], _owner_in(v, "ghost", where)) if o)
            where = self._pid_file("fds", pid)
            for f in self.fds(pid):
                owners.update(o for k in ("ghost", "memfd") if (o := _owner_in(f, k, where)))
        for owner in sorted(owners):
            if not os.path.lexists(os.path.join(self.path, f"pagemap-{owner}")):
                raise ImageError(
                    f"pagemap-{owner} missing: a final dump holds the pages of every "
                    "memory object its processes use, and a restore needs them",
                    self.path,
                )
        return sorted(owners)

    @property
    def stats(self) -> dict | None:
        path = os.path.join(self.path, "stats")
        if not os.path.lexists(path):
            return None
        recs = fmt.read_records(path, "stats", version=self.version)
        if len(recs) != 1:
            raise ImageError(f"expected 1 stats record, found {len(recs)}", path)
        return schema.check("stats", recs[0], path, version=self.version)

    def owners(self) -> list[str]:
        out = []
        for name in sorted(os.listdir(self.path)):
            if name.startswith("pagemap-") and OWNER_RE.match(name[8:]):
                out.append(name[8:])
        return out

    def pagemap(self, owner: str) -> PageMap | None:
        if owner not in self._pagemaps:
            if not OWNER_RE.match(owner):
                raise ImageError(f"bad page owner {owner!r}", self.path)
            exists = os.path.lexists(os.path.join(self.path, f"pagemap-{owner}"))
            self._pagemaps[owner] = PageMap(self, owner) if exists else None
        return self._pagemaps[owner]

    def page_runs(self, owner: str):
        pm = self.pagemap(owner)
        return iter(()) if pm is None else pm.runs()

    # ---- chain ----

    def parent(self) -> Dump | None:
        if self._parent is not False:
            return self._parent
        link = self.inventory["parent"]
        if link is None:
            self._parent = None
            return None
        where = os.path.join(self.path, "inventory")
        if not link or os.path.isabs(link) or "\0" in link:
            raise ImageError(f"parent link {link!r} is not a relative path", where)
        target = os.path.realpath(os.path.join(self.path, link))
        if not target.startswith(self._root + os.sep):
            raise ImageError(
                f"parent link {link!r} leaves {self._root} (the directory holding the chain)",
                where,
            )
        if target in self._seen:
            raise ImageError(f"parent link {link!r} forms a cycle", where)
        if len(self._seen) >= fmt.MAX_CHAIN:
            raise ImageError(f"parent chain longer than {fmt.MAX_CHAIN}", where)
        p = self._reused(target) or Dump(target, self._root, self._seen | {target}, self._reuse)
        if not p.inventory["usable_as_parent"]:
            raise ImageError("marked as not usable as a parent", target)
        if p.page_size != self.page_size:
            raise ImageError("parent has a different page size", target)
        self._parent = p
        return p

    def _reused(self, target: str) -> Dump | None:
        """The reused dump at `target`, if its chain is read to its end and neither
        passes through this chain nor makes it too long (no cycle can form)."""
        for known in self._reuse:
            if known.real != target:
                continue
            chain = known.chain_if_read()
            reals = {d.real for d in chain} if chain else set()
            if chain and not reals & self._seen and len(self._seen) + len(chain) <= fmt.MAX_CHAIN:
                return known
        return None

    def chain_if_read(self) -> list[Dump] | None:
        """chain(), if every parent link of it was followed already."""
        out = [self]
        while out[-1]._parent is not None:
            if out[-1]._parent is False:
                return None
            out.append(out[-1]._parent)
        return out

    def chain(self) -> list[Dump]:
        """This dump and its ancestors, newest first."""
        out = [self]
        while (p := out[-1].parent()) is not None:
            out.append(p)
        return out

    # ---- memory ----

    def segments(self, owner: str, start: int, end: int):
        """Yield (lo, hi, kind, data): kind "data" (bytes), "zero" or "missing".

        Parent runs are resolved through the chain; a page flagged parent that no
        ancestor holds raises ImageError.
        """
        for lo, hi, kind, pm, off in self._resolved(owner, start, end):
            yield lo, hi, kind, pm.read_stream(off, hi - lo) if kind == "data" else None

    def segment_views(self, owner: str, start: int, end: int):
        """segments() without copying page data: a "data" segment comes as
        (lo, hi, "data", (frame, offset)), `frame` being the decompressed frame's
        bytes, so a data run that spans frames comes in one piece per frame."""
        for lo, hi, kind, pm, off in self._resolved(owner, start, end):
            if kind != "data":
                yield lo, hi, kind, None
                continue
            for frame, o, n in pm.stream_views(off, hi - lo):
                yield lo, lo + n, kind, (frame, o)
                lo += n

    def _resolved(self, owner: str, start: int, end: int, seen: frozenset = frozenset()):
        """(lo, hi, kind, pagemap, stream offset) of [start, end), parent runs
        resolved through the chain, and same runs through the owner they name
        (`seen`: the owners that led here; pagemap and offset only for "data")."""
        pm = self.pagemap(owner)
        cur = start
        if pm is not None:
            for lo, hi, w, off in pm.runs_in(start, end):
                if lo > cur:
                    yield cur, lo, "missing", None, 0
                if w == 0:
                    yield lo, hi, "data", pm, off
                elif w == 2:
                    yield lo, hi, "zero", None, 0
                elif w == 3:
                    yield from self._from_same(owner, pm.same_as, lo, hi, seen)
                else:
                    yield from self._from_parent(owner, lo, hi)
                cur = hi
        if cur < end:
            yield cur, end, "missing", None, 0

    def held_ranges(self, owner: str) -> list[Range]:
        """The address ranges [start, end) whose pages this dump holds for `owner`:
        its data and zero runs, and the parts of its parent runs that the chain
        resolves. Read from the page indexes only; no page data is decompressed.
        A parent that recorded another process under the same pid (other start
        time) holds nothing for this one. Remembered: a dump never changes."""
        if owner in self._held:
            return self._held[owner]
        self._held[owner] = held = self._held_ranges(owner)
        return held

    def _held_ranges(self, owner: str) -> list[Range]:
        pm = self.pagemap(owner)
        if pm is None:
            return []
        ps = self.page_size
        own: list[Range] = []
        wanted: list[Range] = []
        same: list[Range] = []
        for i in range(len(pm.r_addr)):
            run = (pm.r_addr[i], pm.r_addr[i] + pm.r_nr[i] * ps)
            (own, wanted, own, same)[pm.r_where[i]].append(run)
        if wanted:
            parent = self.parent()
            if parent is not None and _same_incarnation(owner, self, parent):
                own += intersect(wanted, parent.held_ranges(owner))
        if same:
            self._held[owner] = []  # a circle of same runs holds nothing
            own += intersect(same, self.held_ranges(pm.same_as))
        return normalize(own)

    def _from_same(self, owner: str, other: str, lo: int, hi: int, seen: frozenset):
        """A same run of `owner`: what `other` holds there in this dump."""
        where = os.path.join(self.path, f"pagemap-{owner}")
        seen = seen | {owner}
        if other in seen:
            raise ImageError(f"{owner} pages {lo:#x}-{hi:#x}: same runs in a circle", where)
        for a, b, kind, pm, off in self._resolved(other, lo, hi, seen):
            if kind == "missing":
                raise ImageError(
                    f"{owner} pages {a:#x}-{b:#x} are flagged as the same as {other}'s, "
                    "which does not hold them",
                    where,
                )
            yield a, b, kind, pm, off

    def _from_parent(self, owner: str, lo: int, hi: int):
        p = self.parent()
        if p is None:
            raise ImageError(
                f"{owner} pages {lo:#x}-{hi:#x} are flagged as in a parent, "
                "but the dump has no parent",
                os.path.join(self.path, f"pagemap-{owner}"),
            )
        for a, b, kind, pm, off in p._resolved(owner, lo, hi):
            if kind == "missing":
                raise ImageError(
                    f"{owner} pages {a:#x}-{b:#x} are flagged as in a parent, "
                    "but no ancestor holds them",
                    os.path.join(self.path, f"pagemap-{owner}"),
                )
            yield a, b, kind, pm, off

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        """The bytes process `pid` held at [addr, addr+size) at this dump."""
        return b"".join(self.iter_memory(pid, addr, size))

    def iter_memory(self, pid: int, addr: int, size: int, chunk: int = 4 << 20):
        """read_memory in pieces of at most `chunk` bytes (bounded memory).

        Raises ImageError naming the first range that is not mapped or not held; the
        pieces before it have been yielded already.
        """
        if size < 0 or addr < 0 or addr + size > MAX_U64:
            raise ImageError(f"bad range {addr:#x}+{size:#x}", self.path)
        end = addr + size
        vmas = self.mm(pid).vmas
        starts = [v["start"] for v in vmas]
        cur = addr
        while cur < end:
            i = bisect.bisect_right(starts, cur) - 1
            if i < 0 or vmas[i]["end"] <= cur:
                nxt = starts[i + 1] if i + 1 < len(starts) else end
                raise ImageError(
                    f"{cur:#x}-{min(nxt, end):#x} is not mapped in pid {pid}", self.path
                )
            v = vmas[i]
            piece_end = min(end, v["end"])
            while cur < piece_end:
                stop = min(piece_end, cur + chunk)
                yield self._vma_bytes(pid, v, cur, stop)
                cur = stop

    def _vma_bytes(self, pid: int, v: dict, start: int, end: int) -> bytes:
        """Bytes [start, end) inside one vma."""
        ps = self.page_size
        if v["shmem"] is not None:
            owner, delta = v["shmem"], v["offset"] - v["start"]
        else:
            owner, delta = f"pid-{pid}", 0
        a0 = (start // ps) * ps
        a1 = -(-end // ps) * ps
        buf = bytearray()
        for lo, hi, kind, data in self.segments(owner, a0 + delta, a1 + delta):
            if kind == "data":
                buf += data
            elif kind == "zero" or (v["shmem"] is None and v["kind"] in PRIVATE_ANON):
                buf += bytes(hi - lo)
            else:
                what = v["path"] or v["kind"]
                raise ImageError(
                    f"{max(lo - delta, start):#x}-{min(hi - delta, end):#x} of pid "
                    f"{pid} ({what}) is not held in the images",
                    self.path,
                )
        return bytes(buf[start - a0 : end - a0])

    def close(self) -> None:
        for pm in self._pagemaps.values():
            if pm is not None:
                pm.close()
        if isinstance(self._parent, Dump):
            self._parent.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _same_incarnation(owner: str, a: Dump, b: Dump) -> bool:
    """Do dumps a and b record the same process (or shared object) as `owner`?"""
    kind, _, ident = owner.partition("-")
    if kind != "pid":
        return True  # a shared object is named by device and inode
    return a.inventory["start_times"].get(ident) == b.inventory["start_times"].get(ident)
