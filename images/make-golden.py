#!/usr/bin/env python3
"""Generate the golden image directories under images/golden/ and their expected JSON.

    python3 images/make-golden.py            # rewrite images/golden/
    python3 images/make-golden.py OUTDIR     # write elsewhere (tests do this)

images/golden/chain is the current format (version 2); images/golden/v1/chain is the
same chain as format version 1 wrote it, kept as written (the readers still read it,
this script no longer writes it).

The golden chain is three dumps (pre-dump 1 <- pre-dump 2 <- dump 3) of two
processes sharing one shm object, with here / parent / zero page runs and small
(2-page) frames. Everything is deterministic except compressed sizes, which
depend on the zstd version. Changing the format means bumping FORMAT_VERSION and
regenerating deliberately; tests/test_images_golden.py compares against the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from checkpointer.images import DumpWriter  # noqa: E402
from checkpointer.images.inspect import decode  # noqa: E402

PS = 4096
SHM = "shm-00:01-4242"
CREATED = 1767225600.0  # 2026-01-01 00:00:00 UTC


def page(tag: str, n: int) -> bytes:
    """A recognisable page: the tag and page number repeated."""
    unit = f"{tag}:{n:04d}|".encode()
    return (unit * (PS // len(unit) + 1))[:PS]


def pstree():
    return [
        {"pid": 100, "ppid": 1, "pgid": 100, "sid": 100, "threads": [100, 102]},
        {"pid": 101, "ppid": 100, "pgid": 100, "sid": 100, "threads": [101]},
    ]


def process(pid: int) -> dict:
    return {
        "pid": pid,
        "comm": "golden" if pid == 100 else "golden-child",
        "state": "S",
        "personality": 0,
        "creds": {
            "uid": [1000] * 4, "gid": [1000] * 4, "groups": [27, 1000],
            "cap_inh": 0, "cap_prm": 0, "cap_eff": 0, "cap_bnd": (1 << 41) - 1, "cap_amb": 0,
        },
        "rlimits": {"nofile": [1024, 524288], "stack": [8388608, -1]},
        "sigignore": 0,
        "sigcatch": 1 << 14,
        "sigactions": [sigaction(sig) for sig in range(1, 65) if sig not in (9, 19)],
        "itimers": {"real": [0, 1500000] if pid == 100 else [0, 0], "virtual": [0, 0],
                    "prof": [10000, 7000]},
        "umask": 0o022,
        "prctl": {"dumpable": 1, "pdeathsig": 15 if pid == 101 else 0, "child_subreaper": 0,
                  "no_new_privs": 0, "thp_disable": 1, "securebits": 0},
        "seccomp": 0,
        "shared_siginfo": [siginfo(12, 100)] if pid == 100 else [],
    }  # fmt: skip


def sigaction(sig: int) -> dict:
    """SIGTERM (15) has a handler with SA_RESTORER|SA_SIGINFO; the rest are SIG_DFL."""
    if sig == 15:
        return {"sig": sig, "handler": 0x401200, "flags": 0x04000004, "restorer": 0x401300,
                "mask": 1 << 9}  # fmt: skip
    return {"sig": sig, "handler": 0, "flags": 0, "restorer": 0, "mask": 0}


def siginfo(sig: int, pid: int) -> bytes:
    """A 128-byte siginfo_t: si_signo, si_errno, si_code (SI_QUEUE -1), si_pid, si_uid,
    si_value."""
    head = sig.to_bytes(4, "little") + bytes(4) + (-1).to_bytes(4, "little", signed=True)
    body = bytes(4) + pid.to_bytes(4, "little") + (1000).to_bytes(4, "little")
    return (head + body + (42).to_bytes(8, "little")).ljust(128, b"\0")


def file_id(ino: int, size: int) -> dict:
    return {"dev": 0xFD01, "ino": ino, "mode": 0o100755, "size": size,
            "mtime_ns": 1767225600_000000000}  # fmt: skip


def thread(tid: int, it: int) -> dict:
    names = (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp "
        "ss fs_base gs_base ds es fs gs"
    )
    regs = dict.fromkeys(names.split(), 0)
    regs.update(rip=0x401000 + 0x10 * it, rsp=0x7FFC0000F000 - 8 * it, orig_rax=230, cs=0x33)
    return {
        "tid": tid, "regs": regs, "xstate": bytes(range(64)), "blocked": 0, "pending": 0,
        "shared_pending": 0, "state": "S",
        "tid_address": 0x7F0000100000 + tid * 0x1000 + 0x9D0,
        "robust_list": [0x7F0000100000 + tid * 0x1000 + 0x9E0, 24],
        "rseq": {"ptr": 0x7F0000100000 + tid * 0x1000 + 0xFE0, "size": 32, "sig": 0x53053053},
        "sigaltstack": {"sp": 0x10000, "flags": 0, "size": 0x2000} if tid == 102
        else {"sp": 0, "flags": 2, "size": 0},
        "siginfo": [], "comm": "golden" if tid != 102 else "golden-worker",
    }  # fmt: skip


def mm() -> dict:
    return {
        "start_code": 0x400000, "end_code": 0x402000, "start_data": 0x403000,
        "end_data": 0x404000, "start_brk": 0x500000, "brk": 0x502000,
        "start_stack": 0x7FFC0000F000, "arg_start": 0x7FFC0000F100, "arg_end": 0x7FFC0000F110,
        "env_start": 0x7FFC0000F110, "env_end": 0x7FFC0000F200, "exit_code": 0,
        "auxv": (6).to_bytes(8, "little") + PS.to_bytes(8, "little") + bytes(16),
        "exe": "/usr/bin/golden", "cwd": "/", "root": "/", "exe_stat": file_id(77, 8192),
    }  # fmt: skip


def vma(start, end, prot, kind, path="", shmem=None, offset=0, dev="00:00", inode=0):
    return {
        "start": start, "end": end, "prot": prot, "offset": offset, "dev": dev,
        "inode": inode, "path": path, "kind": kind, "vmflags": ["rd", "mr", "mw", "me"],
        "shmem": shmem, "deleted": False,
        "stat": file_id(inode, 8192) if kind == "file-private" else None,
    }  # fmt: skip


def vmas(pid: int) -> list:
    if pid == 101:
        return [vma(0x10000, 0x14000, "rw-p", "anon")]
    return [
        vma(0x400000, 0x402000, "r-xp", "file-private", "/usr/bin/golden", None, 0, "fd:01", 77),
        vma(0x10000, 0x20000, "rw-p", "anon"),
        vma(0x500000, 0x502000, "rw-p", "heap", "[heap]"),
        vma(0x7F0000000000, 0x7F0000004000, "rw-s", "shm", "/SYSV00001234", SHM, 0, "00:01", 4242),
    ]  # (sorted below)


def fds(pid: int) -> list:
    def stat(ino, mode, size=0):
        return {"dev": 14, "ino": ino, "mode": mode, "size": size, "mtime_ns": 0}

    return [
        {"fd": 0, "target": "/dev/pts/0", "pos": 0, "flags": 0o2, "type": "tty", "mnt_id": 25,
         "cloexec": False, "deleted": False, "stat": stat(3, 0o20620)},
        {"fd": 1, "target": "pipe:[9876]", "pos": 0, "flags": 0o1, "type": "pipe", "mnt_id": 14,
         "cloexec": False, "deleted": False, "stat": stat(9876, 0o10600)},
        {"fd": 3, "target": f"/tmp/golden-{pid}.log (deleted)", "pos": 4096,
         "flags": 0o2102001, "type": "file", "mnt_id": 30, "cloexec": True, "deleted": True,
         "stat": stat(500 + pid, 0o100600, 4096)},
    ]  # fmt: skip


def write_dump(path, kind, parent, it, pages_fn):
    with DumpWriter(path, kind, parent, page_size=PS, frame_size=2 * PS) as w:
        w.write_pstree(pstree())
        stats = {"written": 0, "parent": 0, "zero": 0, "raw": 0, "comp": 0}
        for p in pstree():
            pid = p["pid"]
            w.write_core(pid, process(pid), [thread(t, it) for t in p["threads"]])
            w.write_mm(pid, mm(), sorted(vmas(pid), key=lambda v: v["start"]))
            w.write_fds(pid, fds(pid))
        for owner, ops in pages_fn():
            pw = w.open_pages(owner)
            for op, addr, arg in ops:
                getattr(pw, op)(addr, arg)
            st = pw.close()
            stats["written"] += st.written
            stats["parent"] += st.parent
            stats["zero"] += st.zero
            stats["raw"] += st.bytes_raw
            stats["comp"] += st.bytes_compressed
        w.write_stats(
            {
                "freezing_time": 120 + it, "frozen_time": 3400 - 1000 * it,
                "memdump_time": 800, "memwrite_time": 500, "pages_scanned": 30,
                "pages_written": stats["written"], "pages_skipped_parent": stats["parent"],
                "pages_zero": stats["zero"], "bytes_raw": stats["raw"],
                "bytes_compressed": stats["comp"], "tracker": "soft-dirty", "iteration": it,
            }
        )  # fmt: skip
        w.commit(
            {
                "tracker": "soft-dirty", "kernel": "6.1.0-golden", "created": CREATED + 60 * it,
                "root_pid": 100, "pids": [100, 101],
                "start_times": {"100": 123456, "101": 123460},
                "tracking": {"soft_dirty_cleared": True},
            }
        )  # fmt: skip


def d(tag, *ns):
    return b"".join(page(tag, n) for n in ns)


def dump1():
    return [
        ("pid-100", [
            ("add_data", 0x10000, d("a1", 0, 1, 2, 3)),  # 4 here
            ("add_zero", 0x14000, 2),  # then 4 zero pages
            ("add_zero", 0x16000, 2),
            ("add_data", 0x18000, d("a1", 8)),
            ("add_data", 0x500000, d("h1", 0, 1)),
        ]),
        ("pid-101", [("add_data", 0x10000, d("c1", 0, 1))]),
        (SHM, [("add_data", 0, d("s1", 0, 1, 2, 3))]),
    ]  # fmt: skip


def dump2():
    return [
        ("pid-100", [
            ("add_parent", 0x10000, 2),
            ("add_data", 0x12000, d("a2", 2)),
            ("add_parent", 0x13000, 5),  # 3, zero 4-5, zero 6-7
            ("add_data", 0x18000, d("a2", 8)),
            ("add_parent", 0x500000, 2),
        ]),
        ("pid-101", [("add_parent", 0x10000, 2)]),
        (SHM, [("add_parent", 0, 3), ("add_data", 3 * PS, d("s2", 3))]),
    ]  # fmt: skip


def dump3():
    return [
        ("pid-100", [
            ("add_parent", 0x10000, 1),
            ("add_data", 0x11000, d("a3", 1)),
            ("add_parent", 0x12000, 1),  # from dump 2
            ("add_zero", 0x13000, 1),
            ("add_parent", 0x14000, 5),
            ("add_parent", 0x500000, 1),
            ("add_data", 0x501000, bytes(PS)),  # zero page given as data -> zero run
        ]),
        ("pid-101", [("add_parent", 0x10000, 1), ("add_data", 0x11000, d("c3", 1))]),
        (SHM, [("add_data", 0, d("s3", 0)), ("add_parent", PS, 3)]),
    ]  # fmt: skip


def make_chain(top: str) -> list[str]:
    """Write the three-dump chain into top/1, top/2, top/3; return their paths."""
    os.makedirs(top, exist_ok=True)
    paths = [os.path.join(top, n) for n in ("1", "2", "3")]
    write_dump(paths[0], "pre-dump", None, 0, dump1)
    write_dump(paths[1], "pre-dump", "../1", 1, dump2)
    write_dump(paths[2], "dump", "../2", 2, dump3)
    return paths


def expected(path: str) -> dict:
    """Every file of one dump decoded, as committed in N.expected.json."""
    return {name: decode(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def main(argv: list[str]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    out = argv[1] if len(argv) > 1 else os.path.join(here, "golden")
    chain = os.path.join(out, "chain")
    if os.path.exists(chain):
        shutil.rmtree(chain)
    for p in make_chain(chain):
        with open(p + ".expected.json", "w") as f:
            json.dump(expected(p), f, indent=1, sort_keys=True)
            f.write("\n")
    print(f"wrote {chain}")


if __name__ == "__main__":
    main(sys.argv)
