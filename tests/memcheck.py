"""Compare what a dump holds with what a stopped process's memory holds now."""

from __future__ import annotations

import os

from checkpointer.images import Dump
from checkpointer.kernel.proc import task_dir

SKIP_KINDS = {"vvar", "vsyscall", "special"}
CHUNK = 64 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def read_proc_mem(pid: int, addr: int, size: int) -> bytes:
    # through a live thread: a main thread that called pthread_exit has no memory
    fd = os.open(f"{task_dir(pid)}/mem", os.O_RDONLY)
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


def _file_private_bytes(dump: Dump, pid: int, vma: dict, start: int, end: int) -> bytes:
    """[start, end) of a private file mapping as a restore would rebuild it: the
    pages the dump holds (copied-on-write ones), the file's contents elsewhere
    (zeros past its end). A written page missing from the dump shows up as the
    file's bytes and differs from memory."""
    out = bytearray()
    with open(vma["path"], "rb") as f:
        for lo, hi, kind, data in dump.segments(f"pid-{pid}", start, end):
            if kind == "data":
                out += data
            elif kind == "zero":
                out += bytes(hi - lo)
            else:
                f.seek(vma["offset"] + lo - vma["start"])
                piece = f.read(hi - lo)
                out += piece + bytes(hi - lo - len(piece))
    return bytes(out)


def compare_dump_with_process(dump_dir, pid: int) -> int:
    """Assert every page of every mapping the dump covers for pid (through its
    chain) equals the process's memory now: never-dumped private anon pages must
    be zero, and pages of private file mappings the dump does not hold must equal
    the file. Returns the number of bytes compared."""
    dump = Dump.open(dump_dir)
    kernel_owned = _rseq_areas(dump, pid)
    compared = 0
    for vma in dump.mm(pid).vmas:
        kind = vma["kind"]
        if kind in SKIP_KINDS or (kind == "file" and "w" not in vma["prot"]):
            continue
        start, end = vma["start"], vma["end"]
        # In bounded pieces: a multi-GiB VMA must not be held twice in memory.
        for s in range(start, end, CHUNK):
            e = min(s + CHUNK, end)
            if kind == "file-private":
                held = _file_private_bytes(dump, pid, vma, s, e)
            else:
                held = dump.read_memory(pid, s, e - s)
            held = _blank(held, s, kernel_owned)
            now = _blank(read_proc_mem(pid, s, e - s), s, kernel_owned)
            if held != now:
                bad = next(
                    i for i in range(0, e - s, PAGE) if held[i : i + PAGE] != now[i : i + PAGE]
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
