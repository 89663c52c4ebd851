"""Text rendering of the data checkpointer.images.inspect returns."""

from __future__ import annotations

import json
import time


def human_bytes(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)  # pragma: no cover


def table(t: dict) -> str:
    cols = t["columns"]
    rows = [["-" if c is None else str(c) for c in r] for r in t["rows"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def bar_chart(labels: list[str], values: list[int], width: int = 40, title: str = "") -> str:
    top = max(values, default=0) or 1
    lw = max((len(s) for s in labels), default=0)
    lines = [title] if title else []
    for label, v in zip(labels, values, strict=True):
        n = round(v * width / top)
        lines.append(f"{label.rjust(lw)} |{'#' * n}{' ' if n else ''}{v}")
    return "\n".join(lines)


def stats(t: dict) -> str:
    cols = t["columns"]
    iw, ww = cols.index("ITER"), cols.index("WRITTEN")
    chart = bar_chart(
        [f"iter {r[iw]}" for r in t["rows"]],
        [r[ww] for r in t["rows"]],
        title="pages written per iteration:",
    )
    return table(t) + "\n\n" + chart


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


def _pages(p: dict) -> str:
    same = f", {p['same']} as the parent process's" if p.get("same") else ""
    return f"{p['here']} here, {p['parent']} in parents, {p['zero']} zero{same}"


def show_dump(s: dict) -> str:
    out = [
        f"dump {s['path']}",
        f"  kind {s['kind']}, {'complete' if s['complete'] else 'INCOMPLETE'}, "
        f"format {s['format_version']}, checkpointer {s['tool_version']}",
        f"  created {_ts(s['created'])}, tracker {s['tracker']}, kernel {s['kernel']}, "
        f"page size {s['page_size']}",
        f"  pages: {_pages(s['pages'])}",
        f"  bytes: {human_bytes(s['bytes_raw'])} raw, "
        f"{human_bytes(s['bytes_compressed'])} compressed"
        + (
            f" (ratio {s['bytes_raw'] / s['bytes_compressed']:.2f})"
            if s["bytes_compressed"]
            else ""
        ),
        f"  processes ({len(s['processes'])}, root {s['root_pid']}):",
    ]
    for p in s["processes"]:
        threads = ",".join(str(t) for t in p["threads"])
        # a pre-dump has no command or state, nor vmas of a process that exited
        comm = f" {p['comm']} [{p['state']}]" if "comm" in p else ""
        vmas = f" {p['vmas']} vmas;" if "vmas" in p else ""
        out.append(
            f"    {p['pid']} (ppid {p['ppid']}){comm} threads {threads};{vmas} {_pages(p['pages'])}"
        )
    if s["shared"]:
        out.append(f"  shared memory objects ({len(s['shared'])}):")
        for o in s["shared"]:
            out.append(f"    {o['owner']}: {_pages(o['pages'])}")
    out.append("  chain (newest first):")
    for c in s["chain"]:
        link = f" -> {c['parent']}" if c["parent"] else ""
        state = "complete" if c["complete"] else "INCOMPLETE"
        out.append(f"    {c['path']} [{c['kind']}, {state}, {_ts(c['created'])}]{link}")
    return "\n".join(out)


def show_file(d: dict) -> str:
    key = "frames" if "frames" in d else "entries"
    return "\n".join(show_file_lines(d, d[key]))


def show_file_lines(head: dict, items):
    """Lines describing one file's records (or frames), streamed from `items`."""
    yield f"{head['file']}: {head['kind']} file, format version {head['version']}"
    n = 0
    if head["kind"] == "pages":
        yield "zstd frames:"
        for n, f in enumerate(items, 1):
            yield (
                f"  [{n - 1}] offset {f['off']}, {f['clen']} bytes compressed, "
                f"{f['content_size']} raw, checksum {'yes' if f['checksum'] else 'no'}"
            )
        yield f"{n} frames"
    else:
        yield "records:"
        for n, r in enumerate(items, 1):  # noqa: B007 - n counts them
            yield "  " + json.dumps(r, separators=(", ", ": "))
        yield f"{n} records"


def info(d: dict) -> str:
    if d["kind"] == "pages":
        return (
            f"{d['file']}: kind pages, version {d['version']}, {d['frames']} frames, "
            f"{d['bytes_raw']} bytes raw, {d['bytes_compressed']} compressed"
        )
    return f"{d['file']}: kind {d['kind']}, version {d['version']}, {d['records']} records"
