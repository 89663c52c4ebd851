"""Compare what a dump holds with what a stopped process's memory holds now."""

from __future__ import annotations

import os

from checkpointer.images import Dump

SKIP_KINDS = {"vvar", "vsyscall", "special"}
CHUNK = 64 << 20


def read_proc_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, min(size - len(out), 8 << 20), addr + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def compare_dump_with_process(dump_dir, pid: int) -> int:
    """Assert every page the dump holds for pid (through its chain) equals the
    process's memory now, and that never-dumped private anon pages are zero in the
    process too. Returns the number of bytes compared."""
    dump = Dump.open(dump_dir)
    kernel_owned = _rseq_areas(dump, pid)
    compared = 0
    for vma in dump.mm(pid).vmas:
        kind = vma["kind"]
        if kind in SKIP_KINDS or (kind == "file" and "w" not in vma["prot"]):
            continue
        start, end = vma["start"], vma["end"]
        if kind == "file-private":
            # Only written (private) pages are in the dump; compare those runs.
            ranges = [
                (r.addr, r.addr + r.nr * 4096)
                for r in dump.page_runs(f"pid-{pid}")
                if start <= r.addr < end
            ]
        else:
            ranges = [(start, end)]
        # In bounded pieces: a multi-GiB VMA must not be held twice in memory.
        ranges = [(a, min(a + CHUNK, e)) for s, e in ranges for a in range(s, e, CHUNK)]
        for s, e in ranges:
            held = _blank(dump.read_memory(pid, s, e - s), s, kernel_owned)
            now = _blank(read_proc_mem(pid, s, e - s), s, kernel_owned)
            if held != now:
                bad = next(
                    i for i in range(0, e - s, 4096) if held[i : i + 4096] != now[i : i + 4096]
                )
                raise AssertionError(
                    f"pid {pid} {kind} vma {start:#x}-{end:#x}: page {s + bad:#x} differs"
                )
            compared += e - s
    return compared


def _rseq_areas(dump: Dump, pid: int) -> list[tuple[int, int]]:
    """The threads' rseq areas: the kernel rewrites their cpu/node/cid fields on
    every return to user space, so they hold this CPU's numbers, not the dump's.
    Pre-dumps have no thread records: nothing to leave out."""
    if f"core-{pid}" not in set(os.listdir(dump.path)):
        return []
    areas = []
    for thread in dump.core(pid).threads:
        rseq = thread.get("rseq") or {}
        if rseq.get("ptr"):
            areas.append((rseq["ptr"], rseq["ptr"] + rseq["size"]))
    return areas


def _blank(data: bytes, start: int, areas: list[tuple[int, int]]) -> bytes:
    end = start + len(data)
    inside = [(max(a, start), min(b, end)) for a, b in areas if a < end and b > start]
    if not inside:
        return data
    out = bytearray(data)
    for a, b in inside:
        out[a - start : b - start] = bytes(b - a)
    return bytes(out)
