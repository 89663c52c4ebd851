"""show / info / decode / x / extract / verify as functions returning plain data.

The CLI (checkpointer.cli.inspect_cmds) only parses arguments and prints; text
rendering lives in checkpointer.images.render. Every failure is an ImageError.
"""

from __future__ import annotations

import base64
import json
import os

from checkpointer.errors import ImageError
from checkpointer.images import format as fmt
from checkpointer.images.reader import WHERE_NAME, Core, Dump
from checkpointer.images.verify import verify_dump

X_VIEWS = ("ps", "mems", "rss", "fds", "stats")


def jsonable(obj):
    """Records -> JSON-compatible values; bytes become {"base64": "..."}."""
    if isinstance(obj, bytes | bytearray):
        return {"base64": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


# ---- info / decode ----


def _file_kind(path: str) -> tuple[str, int]:
    """(kind, format version) from the file's header."""
    if os.path.isdir(path):
        raise ImageError("is a directory, expected an image file", path)
    return fmt.read_header(path)


def info(path: str) -> dict:
    """Kind, version and record count (frame count for a pages file)."""
    kind, version = _file_kind(path)
    out = {"file": path, "kind": kind, "version": version}
    if kind == "pages":
        frames = fmt.walk_frames(path)
        out["frames"] = len(frames)
        out["bytes_raw"] = sum(f["content_size"] or 0 for f in frames)
        out["bytes_compressed"] = sum(f["clen"] for f in frames)
    else:
        out["records"] = sum(1 for _ in fmt.iter_records(path, kind))
    return out


def decode(path: str) -> dict:
    """The whole file as JSON-able data; a pages file gives its header and frames."""
    head, items = decode_stream(path)
    key = "frames" if head["kind"] == "pages" else "entries"
    return {**head, key: list(items)}


def decode_stream(path: str):
    """(head, iterator of JSON-able entries or frames): decode without holding it all."""
    kind, version = _file_kind(path)
    head = {"file": os.path.basename(path), "kind": kind, "version": version}
    if kind == "pages":
        return head, iter(fmt.walk_frames(path))
    return head, (jsonable(r) for r in fmt.iter_records(path, kind))


def write_json_stream(head: dict, items, key: str, out, pretty: bool = False) -> None:
    """Write {**head, key: [items...]} as JSON to the text file `out`, item by item."""
    text = json.dumps(head, indent=2 if pretty else None)
    out.write(text[:-1].rstrip() + ("," if head else ""))
    out.write(f'\n  "{key}": [' if pretty else f' "{key}": [')
    for i, item in enumerate(items):
        if pretty:
            body = json.dumps(item, indent=2).replace("\n", "\n    ")
            out.write(("," if i else "") + "\n    " + body)
        else:
            out.write((", " if i else "") + json.dumps(item))
    out.write("\n  ]\n}\n" if pretty else "]}\n")


# ---- show ----


def show(path: str) -> dict:
    """A directory gives a summary of the dump; a file gives its decoded records."""
    if os.path.isdir(path):
        return show_dump(path)
    return decode(path)


def _owner_counts(d: Dump, owner: str) -> dict:
    pm = d.pagemap(owner)
    if pm is None:
        return {"here": 0, "parent": 0, "zero": 0, "same": 0, "bytes_raw": 0,
                "bytes_compressed": 0}  # fmt: skip
    h = pm.head
    return {
        "here": h["pages_here"],
        "parent": h["pages_parent"],
        "zero": h["pages_zero"],
        "same": h.get("pages_same", 0),
        "bytes_raw": h["bytes_raw"],
        "bytes_compressed": h["bytes_compressed"],
    }


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def show_dump(path: str) -> dict:
    with Dump.open(path) as d:
        inv = d.inventory
        procs = []
        for p in d.pstree:
            pid = p["pid"]
            proc = {"pid": pid, "ppid": p["ppid"]}
            if (core := _core(d, pid)) is not None:
                proc.update(comm=core.process["comm"], state=core.process["state"])
            proc["threads"] = p["threads"]
            vmas = _vmas(d, pid)
            if vmas is not None:
                proc["vmas"] = len(vmas)
            proc["pages"] = _owner_counts(d, f"pid-{pid}")
            procs.append(proc)
        shared = [
            {"owner": o, "pages": _owner_counts(d, o)} for o in d.owners() if o.startswith("shm-")
        ]
        total: dict = {}
        for o in d.owners():
            _add(total, _owner_counts(d, o))
        root = os.path.dirname(os.path.realpath(d.path))
        given = os.path.dirname(os.path.normpath(path))
        chain = [
            {
                "path": os.path.normpath(
                    os.path.join(given, os.path.relpath(os.path.realpath(c.path), root))
                ),
                "kind": c.inventory["kind"],
                "created": c.inventory["created"],
                "parent": c.inventory["parent"],
                "complete": c.inventory["complete"],
            }
            for c in d.chain()
        ]
        return {
            "path": path,
            "kind": inv["kind"],
            "complete": inv["complete"],
            "format_version": inv["format_version"],
            "tool_version": inv["tool_version"],
            "created": inv["created"],
            "tracker": inv["tracker"],
            "kernel": inv["kernel"],
            "page_size": inv["page_size"],
            "root_pid": inv["root_pid"],
            "parent": inv["parent"],
            "processes": procs,
            "shared": shared,
            "pages": {k: total.get(k, 0) for k in ("here", "parent", "zero", "same")},
            "bytes_raw": total.get("bytes_raw", 0),
            "bytes_compressed": total.get("bytes_compressed", 0),
            "chain": chain,
        }


# ---- x ----


def x(path: str, view: str) -> dict:
    """A table {"columns": [...], "rows": [[...], ...]} (stats adds "chart")."""
    if view not in X_VIEWS:
        raise ImageError(f"unknown view {view!r} (one of {', '.join(X_VIEWS)})")
    with Dump.open(path) as d:
        return globals()[f"_x_{view}"](d)


def _x_ps(d: Dump) -> dict:
    """A pre-dump has no registers (core-PID): no STATE or COMM column either."""
    rows = []
    cores = [_core(d, p["pid"]) for p in d.pstree]
    with_core = any(c is not None for c in cores)
    for p, core in zip(d.pstree, cores, strict=True):
        row = [p["pid"], p["ppid"], p["pgid"], p["sid"], len(p["threads"])]
        if with_core:
            row += [core.process["state"], core.process["comm"]] if core else [None, None]
        rows.append(row)
    cols = ["PID", "PPID", "PGID", "SID", "THREADS"] + (["STATE", "COMM"] if with_core else [])
    return {"columns": cols, "rows": rows}


def _core(d: Dump, pid: int) -> Core | None:
    """The core records of `pid`; None in a pre-dump, whose tree never stopped."""
    return d.core(pid) if _recorded(d, "core", pid) else None


def _vmas(d: Dump, pid: int) -> list | None:
    """The vmas of `pid`; None (not known) in a pre-dump without mm-PID: the
    process exited while it was read."""
    return d.mm(pid).vmas if _recorded(d, "mm", pid) else None


def _recorded(d: Dump, kind: str, pid: int) -> bool:
    """Does the dump record `kind` of `pid`? A final dump does for every process
    (reading a missing file is an ImageError); a pre-dump where the file is."""
    return d.is_final or os.path.lexists(os.path.join(d.path, f"{kind}-{pid}"))


def _x_mems(d: Dump) -> dict:
    rows = []
    for pid in d.pids:
        for v in _vmas(d, pid) or ():
            rows.append(
                [pid, f"{v['start']:#x}", f"{v['end']:#x}", v["prot"], v["kind"],
                 v["shmem"] or "", v["path"]]
            )  # fmt: skip
    return {"columns": ["PID", "START", "END", "PROT", "KIND", "SHMEM", "PATH"], "rows": rows}


def _x_rss(d: Dump) -> dict:
    rows = []
    ps = d.page_size
    for pid in d.pids:
        for v in _vmas(d, pid) or ():
            owner = v["shmem"] or f"pid-{pid}"
            delta = (v["offset"] - v["start"]) if v["shmem"] else 0
            counts = [0] * len(WHERE_NAME)  # by run kind: here, parent, zero, same
            pm = d.pagemap(owner)
            if pm is not None:
                for lo, hi, w, _ in pm.runs_in(v["start"] + delta, v["end"] + delta):
                    counts[w] += (hi - lo) // ps
            rows.append(
                [pid, f"{v['start']:#x}", f"{v['end']:#x}", (v["end"] - v["start"]) // ps,
                 *counts, v["path"] or v["kind"]]
            )  # fmt: skip
    cols = ["PID", "START", "END", "PAGES", *(w.upper() for w in WHERE_NAME), "PATH"]
    return {"columns": cols, "rows": rows}


def _x_fds(d: Dump) -> dict:
    rows = []
    for pid in d.pids:
        for f in d.fds(pid):
            rows.append([pid, f["fd"], f["type"], f["pos"], f"{f['flags']:#o}", f["target"]])
    return {"columns": ["PID", "FD", "TYPE", "POS", "FLAGS", "TARGET"], "rows": rows}


def _x_stats(d: Dump) -> dict:
    rows = []
    for i, c in enumerate(reversed(d.chain())):
        st = c.stats
        totals: dict = {}
        for o in c.owners():
            _add(totals, _owner_counts(c, o))
        if st is None:
            st = {
                "iteration": None, "tracker": c.inventory["tracker"], "frozen_time": None,
                "pages_written": totals.get("here", 0),
                "pages_skipped_parent": totals.get("parent", 0),
                "pages_zero": totals.get("zero", 0),
                "bytes_raw": totals.get("bytes_raw", 0),
                "bytes_compressed": totals.get("bytes_compressed", 0),
            }  # fmt: skip
        frozen = st["frozen_time"]
        rows.append(
            [i if st["iteration"] is None else st["iteration"], c.inventory["kind"],
             st["tracker"], st["pages_written"], st["pages_skipped_parent"], st["pages_zero"],
             None if frozen is None else round(frozen / 1000, 1), st["bytes_raw"],
             st["bytes_compressed"], os.path.basename(c.path)]
        )  # fmt: skip
    cols = ["ITER", "KIND", "TRACKER", "WRITTEN", "PARENT", "ZERO", "FROZEN_MS",
            "BYTES_RAW", "BYTES_COMPRESSED", "DIR"]  # fmt: skip
    return {"columns": cols, "rows": rows}


# ---- extract / verify ----


def parse_addr(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ImageError(f"bad address {text!r} (decimal or 0x... hex)") from None


def extract(path: str, pid: int, addr: int, size: int) -> bytes:
    with Dump.open(path) as d:
        return d.read_memory(pid, addr, size)


def extract_to(path: str, pid: int, addr: int, size: int, out) -> int:
    """Stream the bytes into the binary file object `out`; return the count written.

    On an error part of the range may have been written; the caller discards it.
    """
    n = 0
    with Dump.open(path) as d:
        for piece in d.iter_memory(pid, addr, size):
            out.write(piece)
            n += len(piece)
    return n


def verify(path: str) -> str:
    t = verify_dump(path)
    return (
        f"OK {path}: {t['dumps']} dump(s) in chain, {t['files']} files, "
        f"{t['frames']} frames, {t['pages']} pages, {t['parent_pages']} parent pages resolved"
    )
