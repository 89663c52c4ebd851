"""Small valid records and realistic page data, for tests, benchmarks and fuzzing."""

from __future__ import annotations

import os
import random
from array import array

from checkpointer.images.writer import DumpWriter


def pstree_rec(pid: int, ppid: int = 1, threads: list[int] | None = None) -> dict:
    return {"pid": pid, "ppid": ppid, "pgid": pid, "sid": pid, "threads": threads or [pid]}


def process_rec(pid: int, comm: str = "sample") -> dict:
    return {
        "pid": pid, "comm": comm, "state": "S", "personality": 0,
        "creds": {"uid": [0] * 4, "gid": [0] * 4, "groups": [], "cap_inh": 0, "cap_prm": 0,
                  "cap_eff": 0, "cap_bnd": 0, "cap_amb": 0},
        "rlimits": {"nofile": [1024, 4096]}, "sigignore": 0, "sigcatch": 0,
        "sigactions": [
            {"sig": sig, "handler": 0, "flags": 0, "restorer": 0, "mask": 0}
            for sig in range(1, 65) if sig not in (9, 19)
        ],
        "itimers": {"real": [0, 0], "virtual": [0, 0], "prof": [0, 0]},
        "umask": 0o022,
        "prctl": {"dumpable": 1, "pdeathsig": 0, "child_subreaper": 0, "no_new_privs": 0,
                  "thp_disable": 0, "securebits": 0},
        "seccomp": 0,
        "shared_siginfo": [],
    }  # fmt: skip


def thread_rec(tid: int) -> dict:
    return {
        "tid": tid, "regs": {"rip": 0x401000, "rsp": 0x7FFC0000F000}, "xstate": b"\0" * 64,
        "blocked": 0, "pending": 0, "shared_pending": 0, "state": "S",
        "tid_address": 0, "robust_list": [0, 0], "rseq": {"ptr": 0, "size": 0, "sig": 0},
        "sigaltstack": {"sp": 0, "flags": 2, "size": 0}, "siginfo": [], "comm": "sample",
    }  # fmt: skip


def mm_rec() -> dict:
    keys = ("start_code end_code start_data end_data start_brk brk start_stack arg_start "
            "arg_end env_start env_end exit_code").split()  # fmt: skip
    rec = dict.fromkeys(keys, 0)
    rec.update(auxv=b"", exe="/bin/sample", cwd="/", root="/", exe_stat=None)
    return rec


def vma_rec(start: int, end: int, kind: str = "anon", shmem=None, offset=0, path="") -> dict:
    return {
        "start": start, "end": end, "prot": "rw-s" if shmem else "rw-p", "offset": offset,
        "dev": "00:00", "inode": 0, "path": path, "kind": kind, "vmflags": ["rd", "wr"],
        "shmem": shmem, "deleted": False, "stat": None,
    }  # fmt: skip


def fd_rec(fd: int, target: str = "/dev/null") -> dict:
    return {
        "fd": fd, "target": target, "pos": 0, "flags": 2, "type": "file", "mnt_id": 1,
        "cloexec": False, "deleted": False, "stat": None,
    }  # fmt: skip


def stats_rec(written=0, parent=0, zero=0, raw=0, comp=0, iteration=None) -> dict:
    return {
        "freezing_time": 1, "frozen_time": 2, "memdump_time": 3, "memwrite_time": 4,
        "pages_scanned": written + parent + zero, "pages_written": written,
        "pages_skipped_parent": parent, "pages_zero": zero, "bytes_raw": raw,
        "bytes_compressed": comp, "tracker": "full", "iteration": iteration,
    }  # fmt: skip


def write_simple(path, pid, vmas, page_ops, parent=None, kind="dump", **kw):
    """One-process dump: vmas as vma records; page_ops {owner: [(op, addr, arg)]}."""
    with DumpWriter(path, kind, parent, **kw) as w:
        w.write_pstree([pstree_rec(pid)])
        w.write_core(pid, process_rec(pid), [thread_rec(pid)])
        w.write_mm(pid, mm_rec(), vmas)
        w.write_fds(pid, [fd_rec(0)])
        for owner, ops in page_ops.items():
            pw = w.open_pages(owner)
            for op, addr, arg in ops:
                getattr(pw, op)(addr, arg)
            pw.close()
        w.write_stats(stats_rec())
        return w.commit({"tracker": "full", "created": 0.0})


# ---- realistic memory ----

_WORDS = None


def _words(rng: random.Random) -> list[bytes]:
    global _WORDS
    if _WORDS is None:
        letters = "etaoinshrdlucmfwypvbgkqjxz"
        _WORDS = ["".join(rng.choices(letters, k=rng.randint(2, 10))).encode() for _ in range(3000)]
    return _WORDS


def mixed_pages(nbytes: int, seed: int = 1, page_size: int = 4096) -> bytearray:
    """Memory-like data, page kinds chosen in clusters of 1-32 pages.

    ~30% zero pages, 20% text (random words), 30% arrays of 32-byte structs (a
    pointer, a small counter, flags, padding), 5% half-used pages (struct data then
    zeros), 15% random bytes (compressed or encrypted data).
    """
    rng = random.Random(seed)
    words = _words(rng)
    text = b" ".join(rng.choices(words, k=(1 << 20) // 5))
    out = bytearray(nbytes)
    npages = nbytes // page_size
    i = 0
    while i < npages:
        run = min(npages - i, rng.randint(1, 32))
        r = rng.random()
        for off in range(i * page_size, (i + run) * page_size, page_size):
            if r < 0.30:
                continue  # zero page
            if r < 0.50:
                j = rng.randrange(len(text) - page_size)
                out[off : off + page_size] = text[j : j + page_size]
            elif r < 0.85:
                used = page_size if r < 0.80 else page_size // 2
                out[off : off + used] = _structs(rng, used // 32)
            else:
                out[off : off + page_size] = os.urandom(page_size)
        i += run
    return out


def _structs(rng: random.Random, n: int) -> bytes:
    base = rng.choice((0x55D4_2000_0000, 0x7F3A_1000_0000))
    vals = array("Q")
    counter = rng.getrandbits(12)
    for _ in range(n):
        counter += rng.randint(1, 3)
        vals.extend((base + (rng.getrandbits(16) << 4), counter, rng.getrandbits(2), 0))
    return vals.tobytes()
