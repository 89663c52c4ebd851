"""verify: check a dump and its whole parent chain, stop at the first problem."""

from __future__ import annotations

import os
import re

from checkpointer.errors import ImageError
from checkpointer.images import format as fmt
from checkpointer.images.format import OWNER_RE
from checkpointer.images.reader import Dump

PID_FILE_RE = re.compile(r"(core|mm|fds)-([1-9][0-9]{0,9})\Z")

# What a final dump holds for every process, all of which a restore reads
# (restore/images.py): registers and threads, mappings, open files (an empty file
# when it has none); and the page map of each owner in use (Dump.owners_in_use:
# its private memory's among them; pages-OWNER beside it is checked with every
# pagemap). A pre-dump holds memory only: its tree was never frozen, so it has no
# registers or files, and a process that exited while it was read has no mm or
# pages either.
FINAL_DUMP_FILES = ("core-{pid}", "mm-{pid}", "fds-{pid}")


def verify_dump(path: str) -> dict:
    """Raise ImageError at the first problem; return counts when sound."""
    top = Dump.open(path)
    totals = {"dumps": 0, "files": 0, "frames": 0, "pages": 0, "parent_pages": 0}
    try:
        for d in top.chain():
            _verify_one(d, totals)
    finally:
        top.close()
    return totals


def _verify_one(d: Dump, totals: dict) -> None:
    totals["dumps"] += 1
    names = sorted(os.listdir(d.path))
    pids = set(d.pids)
    inv = d.inventory
    if set(inv["pids"]) != pids:
        raise ImageError("inventory pids do not match pstree", os.path.join(d.path, "inventory"))
    if pids and inv["root_pid"] not in pids:
        raise ImageError("root_pid is not in pstree", os.path.join(d.path, "inventory"))
    for name in names:
        p = os.path.join(d.path, name)
        if not os.path.isfile(p) or os.path.islink(p):
            raise ImageError("unexpected non-regular file in dump directory", p)
        kind = fmt.kind_of_name(name)
        m = PID_FILE_RE.match(name)
        ok = (
            name in ("inventory", "pstree", "stats")
            or (m and int(m.group(2)) in pids)
            or (kind in ("pagemap", "pages") and OWNER_RE.match(name.partition("-")[2]))
        )
        if not ok or kind is None:
            raise ImageError("unexpected file in dump directory", p)
        _, version = fmt.read_header(p, kind)
        if version != d.version:
            raise ImageError(
                f"file is format version {version}, its dump's inventory says {d.version}", p
            )
        totals["files"] += 1
    if d.is_final:
        for pid in d.pids:
            for name in FINAL_DUMP_FILES:
                if name.format(pid=pid) not in names:
                    raise ImageError(
                        f"{name.format(pid=pid)} missing: a final dump holds it for every "
                        "process in pstree, and a restore needs it",
                        d.path,
                    )
        d.owners_in_use()  # a page map for each
    for pst in d.pstree:
        pid = pst["pid"]
        if f"core-{pid}" in names:
            core = d.core(pid)
            where = os.path.join(d.path, f"core-{pid}")
            if core.process["pid"] != pid:
                raise ImageError(f"process record is for pid {core.process['pid']}", where)
            if sorted(t["tid"] for t in core.threads) != sorted(pst["threads"]):
                raise ImageError("thread records do not match the pstree threads", where)
        if f"mm-{pid}" in names:
            d.mm(pid)
        d.fds(pid)
    d.stats  # noqa: B018 - parse and check
    for owner in d.owners():
        pm = d.pagemap(owner)
        if f"pages-{owner}" not in names:
            raise ImageError(f"pages-{owner} missing for this pagemap", pm.path)
        frames = fmt.walk_frames(pm.pages_path)
        if len(frames) != len(pm.f_off):
            raise ImageError(
                f"holds {len(frames)} zstd frames, its pagemap indexes {len(pm.f_off)}",
                pm.pages_path,
            )
        for i, fr in enumerate(frames):
            if fr["off"] != pm.f_off[i] or fr["clen"] != pm.f_clen[i]:
                raise ImageError(f"frame {i} does not match its index entry", pm.pages_path)
            if not fr["checksum"]:
                raise ImageError(f"frame {i} has no content checksum", pm.pages_path)
            pm.frame(i)  # decompress: checksum and length checked
            totals["frames"] += 1
        pm._cache.clear()
        totals["pages"] += pm.head["pages_here"]
        for r in pm.runs():
            end = r.addr + r.nr * d.page_size
            if r.where == "parent":
                for _ in d._from_parent(owner, r.addr, end):
                    pass
                totals["parent_pages"] += r.nr
            elif r.where == "same":
                for _ in d._from_same(owner, pm.same_as, r.addr, end, frozenset()):
                    pass
    for name in names:
        if name.startswith("pages-") and f"pagemap-{name[6:]}" not in names:
            raise ImageError("pages file without a pagemap", os.path.join(d.path, name))
