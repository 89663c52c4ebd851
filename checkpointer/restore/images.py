"""Read and check everything a restore needs from a dump, before anything is built.

Every problem here (incomplete or corrupt chain, an old format, a PID taken, a
file changed since the dump, another kernel's vdso) is refused with one line
while no process of the restored tree exists yet.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import dataclass, field
from stat import S_ISLNK

from checkpointer.errors import CheckpointError, ImageError
from checkpointer.fdstate.tree import epoll_without_restorer
from checkpointer.images import Dump
from checkpointer.images.resolve import Piece, resolve
from checkpointer.images.resolve import known as resolve_known
from checkpointer.kernel import proc, sysvshm
from checkpointer.pageruns import within

VDSO_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")
UFFD_LINK = "anon_inode:[userfaultfd]"
# capability -> its bit(s): set_tid and map_files take either of two.
NEEDED_CAPS = {"CAP_SYS_PTRACE": (19,), "CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE": (21, 40)}


class RestoreError(CheckpointError):
    """The images cannot be restored here, or restoring them failed."""


DELETED = " (deleted)"  # what /proc adds to the path of a file that was unlinked


@dataclass
class ProcessImage:
    """One process of the dump: its pstree entry and records."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    tids: list[int]
    process: dict
    threads: list[dict]
    mm: dict
    vmas: list[dict]
    fds: list[dict]
    children: list[int] = field(default_factory=list)
    zombies: list[dict] = field(default_factory=list)  # {pid, pgid, sid, exit_status}


@dataclass
class RestoreImages:
    dump: Dump
    processes: list[ProcessImage]  # parents before children, the root first
    pieces: dict[str, list[Piece]]  # owner -> where each page comes from

    @property
    def root(self) -> ProcessImage:
        return self.processes[0]

    def by_pid(self) -> dict[int, ProcessImage]:
        return {p.pid: p for p in self.processes}


@dataclass
class ReadChain:
    """A dump opened with its whole chain, and what resolve() gave for some owners:
    a later dump of the chain reuses both (a migration's final restore, the
    template's pre-dump)."""

    dump: Dump
    pieces: dict[str, list[Piece]]


def load(path: str, reuse: ReadChain | None = None) -> RestoreImages:
    """Open a final dump and its chain; every page reference must resolve."""
    dump = Dump.open(path, reuse=(reuse.dump,) if reuse else ())
    known = resolve_known(reuse.dump, reuse.pieces) if reuse else None
    if dump.inventory["kind"] != "dump":
        raise ImageError("is a pre-dump (memory only): restore a final dump", path)
    version = dump.inventory["format_version"]
    if version < 2:
        raise ImageError(
            f"format version {version} images lack what restore needs "
            "(signal handlers, thread state): dump again with this checkpointer",
            path,
        )
    tracked_uffd = {
        int(pid): st.get("uffd_fd")
        for pid, st in dump.inventory["tracking"].get("per_pid", {}).items()
        if isinstance(st, dict)
    }
    procs: dict[int, ProcessImage] = {}
    for entry in dump.pstree:
        pid = entry["pid"]
        core = dump.core(pid)
        mm = dump.mm(pid)
        fds = [
            f
            for f in dump.fds(pid)
            if not (f["target"] == UFFD_LINK and f["fd"] == tracked_uffd.get(pid))
        ]
        procs[pid] = ProcessImage(
            pid, entry["ppid"], entry["pgid"], entry["sid"], list(entry["threads"]),
            core.process, core.threads, mm.mm, mm.vmas, fds,
            zombies=list(entry.get("zombies", [])),
        )  # fmt: skip
    root = dump.inventory["root_pid"]
    order = _tree_order(procs, root, path)
    pieces = {owner: resolve(dump, owner, known) for owner in dump.owners_in_use()}
    return RestoreImages(dump, order, pieces)


# What a template may hold of a process (restore/template.py): the private
# mappings a clone of it keeps (restore/inherit.py), of files that are here.
TEMPLATE_KINDS = ("anon", "heap", "stack", "file-private")


def template_image(path: str, reuse: ReadChain | None = None):
    """The root process of the dump at `path` (a pre-dump will do) with only its
    private mappings that a template can rebuild, where their pages come from, and
    the chain as read (-> ProcessImage, [Piece], ReadChain)."""
    dump = Dump.open(path, reuse=(reuse.dump,) if reuse else ())
    known = resolve_known(reuse.dump, reuse.pieces) if reuse else None
    root = dump.inventory["root_pid"]
    entry = next((e for e in dump.pstree if e["pid"] == root), None)
    if entry is None:
        raise ImageError(f"root pid {root} is not in the pstree", path)
    mm = dump.mm(root)
    vmas = [
        v for v in mm.vmas
        if v["kind"] in TEMPLATE_KINDS and not v["shmem"] and "ghost" not in v
        and "dc" not in v["vmflags"] and "wf" not in v["vmflags"]
        and (v["kind"] != "file-private" or _still_there(v))
    ]  # fmt: skip
    ranges = [(v["start"], v["end"]) for v in vmas]
    resolved = resolve(dump, f"pid-{root}", known)
    pieces = [
        Piece(lo, hi, p.source, p.off + lo - p.start if p.source else 0)
        for p in resolved
        for lo, hi in within(ranges, p.start, p.end)
    ]
    image = ProcessImage(
        root, entry["ppid"], entry["pgid"], entry["sid"], list(entry["threads"]),
        {}, [], mm.mm, vmas, [],
    )  # fmt: skip
    dump.chain()  # read to its end: what a later dump reuses (Dump.open)
    return image, pieces, ReadChain(dump, {f"pid-{root}": resolved})


def _still_there(vma: dict) -> bool:
    """The file a private mapping was dumped from is at its path, unchanged."""
    try:
        check_identity(vma["path"], vma.get("stat"), vma.get("dev"), vma.get("inode"), "")
    except RestoreError:
        return False
    return True


def _tree_order(procs: dict[int, ProcessImage], root: int, path: str) -> list[ProcessImage]:
    if root not in procs:
        raise ImageError(f"root pid {root} is not in the pstree", path)
    for p in procs.values():
        if p.pid != root and p.ppid in procs:
            procs[p.ppid].children.append(p.pid)
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        order.append(procs[pid])
        queue.extend(sorted(procs[pid].children))
    # Orphans (their parent is not in the tree) hang below the root (CLONE_PARENT).
    order += [p for pid, p in sorted(procs.items()) if p not in order]
    return order


def preflight(images: RestoreImages, shell_job: bool = False, source_alive: bool = False) -> None:
    """Refuse what cannot work here, before any process is created. source_alive:
    the dumped tree still runs on this host (a migration on one host checks before
    it kills the source), so its PIDs and bound addresses are expected to be taken."""
    caps = proc.read_creds(os.getpid())["cap_eff"]
    missing = [name for name, bits in NEEDED_CAPS.items() if not any(caps >> b & 1 for b in bits)]
    if missing:
        raise RestoreError(
            f"restore needs root: {' and '.join(missing)} missing "
            "(clone3 with set_tid, ptrace, /proc/PID/map_files)"
        )
    if images.dump.inventory.get("shell_job") and not shell_job:
        raise RestoreError(
            "dumped with --shell-job (the tree used its shell's terminal and session): "
            "restore with --shell-job"
        )
    # A session or group whose leader is outside the tree: rebuilt with a helper of
    # the leader's PID if that leader is gone (an orphan's), else joined as it is
    # (the restorer's own session or group, as for a job started from it).
    own_ptys = {f["pty_master"]["index"] for p in images.processes for f in p.fds
                if "pty_master" in f}  # fmt: skip
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    pids = {t for p in images.processes for t in p.tids + [z["pid"] for z in p.zombies]}
    for tid in sorted(pids):
        if tid > pid_max:
            raise RestoreError(f"PID {tid} is above this system's pid_max {pid_max}")
        if not source_alive and proc.exists(tid) and not _reaped_soon(tid):
            raise RestoreError(f"PID {tid} is taken ({_holder(tid)}); it must be free")
    if not source_alive:
        _check_ids_released(pids)
    if found := epoll_without_restorer({p.pid: p.fds for p in images.processes}):
        pid, rec, tfd = found
        raise RestoreError(
            f"fd {rec['fd']} of process {pid} (epoll): no process holding it has every "
            f"watched fd open (fd {tfd} is closed there): its watches cannot be restored"
        )
    for p in images.processes:
        _check_seccomp(p)
        _check_vdso(images, p)
        for v in p.vmas:
            _check_vma(p, v)
        for f in p.fds:
            ours = shell_job or f.get("pty", {}).get("index", -1) in own_ptys
            _check_fd(p, f, ours, source_alive, pids)
        for name in ("exe", "cwd"):
            path = p.mm.get(name)
            if name == "exe" and path and path.endswith(DELETED):
                # deleted since it started: its mapping's ghost stands in (memory.py)
                if any(v.get("path") == path.removesuffix(DELETED) and "ghost" in v
                       for v in p.vmas):  # fmt: skip
                    continue
            if name == "cwd" and path and path.endswith(DELETED):
                continue  # made again for the restore (ghosts.py)
            if path and not os.path.exists(path):
                raise RestoreError(f"{name} of process {p.pid} ({path}) is missing")


# seccomp(2) takes at most BPF_MAXINSNS instructions per program; the metadata
# flags a dump can read are LOG and SPEC_ALLOW.
SECCOMP_MAX_PROG = 4096 * 8
SECCOMP_FLAGS = 2 | 4


def _check_seccomp(p: ProcessImage) -> None:
    """Filters are attached again (creds.py); strict mode, or a filtering process
    dumped without its filters (an older checkpointer), is refused."""
    if p.process.get("seccomp") == proc.SECCOMP_MODE_STRICT:
        raise RestoreError(f"process {p.pid} runs in seccomp strict mode: not supported")
    filtered = False
    for thread in p.threads:
        filters = thread.get("seccomp_filters", [])
        for f in filters if isinstance(filters, list) else [None]:
            prog, flags = (f.get("prog"), f.get("flags")) if isinstance(f, dict) else (0, 0)
            if not (
                isinstance(prog, bytes) and 0 < len(prog) <= SECCOMP_MAX_PROG
                and len(prog) % 8 == 0 and isinstance(flags, int) and not flags & ~SECCOMP_FLAGS
            ):  # fmt: skip
                raise ImageError(f"thread {thread['tid']}: a malformed seccomp filter")
            filtered = True
    if p.process.get("seccomp") and not filtered:
        raise RestoreError(f"process {p.pid} runs under seccomp and its filters were not dumped")


def leaders_outside(images: RestoreImages) -> set[int]:
    """Session and group ids of the tree whose leader is not in it."""
    there = {p.pid for p in images.processes} | {
        z["pid"] for p in images.processes for z in p.zombies
    }
    ids = {p.sid for p in images.processes} | {p.pgid for p in images.processes}
    return ids - there


def _reaped_soon(pid: int, timeout: float = 10.0) -> bool:
    """A just-killed original is a zombie until its parent reaps it: wait a little."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.read_stat(pid).state not in ("Z", "X"):
                return False
        except CheckpointError:
            return True  # reaped
        time.sleep(0.01)
    return not proc.exists(pid)


def _check_ids_released(pids: set[int], timeout: float = 10.0) -> None:
    """A PID stays taken while it is any process's group or session id, after its
    leader is gone: a killed original's child that its parent did not reap yet (a
    shell's command, reparented to a slow init) holds it. Wait for such zombies;
    refuse, naming it, a member that lives on or is not reaped in time."""
    deadline = time.monotonic() + timeout
    while members := proc.members_of(pids):
        live = [m for m in members if m.state not in ("Z", "X")]
        if live or time.monotonic() > deadline:
            m = (live or members)[0]
            held = m.pgrp if m.pgrp in pids else m.session
            what = "process group" if m.pgrp in pids else "session"
            still = "lives on" if live else f"is a zombie its parent {m.ppid} has not reaped"
            raise RestoreError(
                f"PID {held} is taken: it is still the {what} of process {m.pid} "
                f"({m.comm}), which {still}; it must be free"
            )
        time.sleep(0.02)


def _holder(pid: int) -> str:
    """Who has the PID: a zombie's parent, who should reap it, is named too."""
    try:
        st = proc.read_stat(pid)
    except CheckpointError:
        return "by ?"
    if st.state == "Z":
        parent = f"{st.ppid} ({_comm(st.ppid)})"
        return f"by a zombie {st.comm} that its parent {parent} has not reaped"
    return f"by {st.comm}"


def _comm(pid: int) -> str:
    try:
        return proc.read_comm(pid)
    except CheckpointError:
        return "?"


# -- files -----------------------------------------------------------------------------

FILE_KINDS = ("file", "file-private")


def _check_vma(p: ProcessImage, v: dict) -> None:
    where = f"process {p.pid} maps {v['path'] or v['kind']} at {v['start']:#x}"
    if "ht" in v["vmflags"]:
        raise RestoreError(f"{where}: hugetlb mappings are not restored")
    if v["kind"] == "shm":
        _check_sysv(v, where)
        return
    if v["kind"] not in FILE_KINDS:
        return
    if v.get("deleted"):
        _check_ghost(v.get("ghost"), where)
        return
    # A shared mapping's pages are the file's own, not in the images: like an fd's
    # file, it only has to be the same file (its target may have written it since).
    private = v["kind"] == "file-private"
    check_identity(v["path"], v.get("stat"), v["dev"], v["inode"], where, contents=private)


def _check_sysv(v: dict, where: str) -> None:
    seg = v.get("sysv")
    if seg is None:
        raise RestoreError(f"{where}: SysV shared memory dumped without its segment")
    if v["offset"] != 0 or v["end"] - v["start"] < seg["size"]:
        raise RestoreError(f"{where}: part of a SysV segment is mapped: not restored")
    found = sysvshm.find_key(seg["key"]) if seg["key"] else None
    # A segment outlives its processes: the dumped one, still there and unused, is
    # taken again (and given the dumped contents); any other is in the way.
    if found and (found["id"], found["size"], found["attached"]) != (seg["id"], seg["size"], 0):
        raise RestoreError(
            f"{where}: SysV shared memory key {seg['key']:#x} is taken "
            f"(segment {found['id']}, {found['size']} bytes, attached {found['attached']} times)"
        )


def check_identity(
    path: str, stat: dict | None, dev: str | None, ino: int | None, where: str,
    contents: bool = True,
) -> None:  # fmt: skip
    """Refuse a file that is missing or is not the one dumped: another inode, or,
    where the restore takes data from it (`contents`: a private mapping's pages
    never written), another size or mtime. An open fd only needs the same file:
    others may write it meanwhile (a log), and its readers expect that (tail -f)."""
    link = stat is not None and S_ISLNK(stat["mode"])  # an O_PATH fd of the link itself
    try:
        st = os.lstat(path) if link else os.stat(path)
    except OSError as exc:
        raise RestoreError(f"{where}: {path}: {exc.strerror}") from None
    if stat is not None and not contents:
        same = (st.st_dev, st.st_ino) == (stat["dev"], stat["ino"])
    elif stat is not None:
        same = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            stat["dev"], stat["ino"], stat["size"], stat["mtime_ns"],
        )  # fmt: skip
    else:
        major, _, minor = (dev or "0:0").partition(":")
        same = st.st_ino == ino and (os.major(st.st_dev), os.minor(st.st_dev)) == (
            int(major, 16), int(minor, 16),
        )  # fmt: skip
    if not same:
        raise RestoreError(f"{where}: {path} changed since the dump (not the same file)")


def _check_ghost(ghost: dict | None, where: str) -> None:
    """A deleted file is recreated in the directory it was deleted from (made
    again if it went too)."""
    if ghost is None:
        raise RestoreError(f"{where}: the file was deleted and the images lack its contents")


FD_TYPES = ("file", "dir", "tty")


_PROC_TASK = re.compile(r"/proc/(\d+)(?:/task/(\d+))?(?:/|$)")


def procfs_task(path: str, tids: set[int]) -> int | None:
    """The thread of the tree (`tids`) whose /proc directory holds `path`
    (/proc/P/..., /proc/P/task/T/...; /proc/self and thread-self read as such), or
    None. Such a file is one of the restored process's own once it exists again
    with its PID: nothing to check before, opened after (files.py)."""
    m = _PROC_TASK.match(path)
    if m is None:
        return None
    tid = int(m.group(2) or m.group(1))
    return tid if tid in tids and int(m.group(1)) in tids else None


def _check_fd(
    p: ProcessImage, f: dict, shell_job: bool, source_alive: bool, tids: set[int]
) -> None:
    where = f"fd {f['fd']} of process {p.pid} ({f['target']})"
    if procfs_task(f["target"], tids) is not None:
        return
    from checkpointer.restore.files import KINDS

    kind = KINDS.get(f["type"])
    if kind is not None and hasattr(kind, "check"):
        kind.check(p, f, source_alive)  # raises RestoreError naming what it refuses
        return
    if f["type"] not in FD_TYPES and kind is None:
        raise RestoreError(f"{where}: a {f['type']} cannot be restored yet")
    if "memfd" in f:
        return
    if f.get("deleted"):
        _check_ghost(f.get("ghost"), where)
        return
    if f["type"] == "tty" and not shell_job:  # (a pty of the tree's own passes)
        raise RestoreError(f"{where}: a terminal; restore with --shell-job to attach ours")
    if "pty_master" in f:
        if f["pty_master"].get("input") and not proc.read_creds(os.getpid())["cap_eff"] >> 21 & 1:
            raise RestoreError(
                f"{where}: input queued in the terminal is queued again with TIOCSTI, "
                "which needs CAP_SYS_ADMIN"
            )
        return
    if f["type"] == "file" and f.get("stat") is not None and not f["target"].startswith("/proc/"):
        # (a procfs file's inode number is made up when it is looked up: only
        # whether it exists tells)
        check_identity(f["target"], f["stat"], None, None, where, contents=False)
    elif f["type"] in ("file", "dir") and not os.path.exists(f["target"]):
        raise RestoreError(f"{where}: missing")


# -- vdso ------------------------------------------------------------------------------------


def own_vdso_layout() -> dict[str, tuple[int, int]]:
    """{name: (start, end)} of this process's [vvar], [vvar_vclock], [vdso]: every
    process forked from us has the same."""
    return {m.path: (m.start, m.end) for m in proc.read_maps(os.getpid()) if m.path in VDSO_NAMES}


def dumped_vdso_layout(p: ProcessImage) -> dict[str, tuple[int, int]]:
    return {v["path"]: (v["start"], v["end"]) for v in p.vmas if v["path"] in VDSO_NAMES}


def _check_vdso(images: RestoreImages, p: ProcessImage) -> None:
    ours, theirs = own_vdso_layout(), dumped_vdso_layout(p)
    if not theirs:
        return  # a process without a vdso (unusual, but nothing to move)
    kernel = images.dump.inventory["kernel"]
    shape = {k: (e - s) for k, (s, e) in ours.items()}
    if {k: (e - s) for k, (s, e) in theirs.items()} != shape or _offsets(ours) != _offsets(theirs):
        raise RestoreError(
            f"process {p.pid}: the vdso/vvar layout differs from this kernel's "
            f"(dumped on {kernel}, this is {os.uname().release}); restore on the same kernel"
        )
    start, end = theirs["[vdso]"]
    dumped = images.dump.read_memory(p.pid, start, end - start)
    mine_start, mine_end = ours["[vdso]"]
    if dumped != ctypes.string_at(mine_start, mine_end - mine_start):
        raise RestoreError(
            f"process {p.pid}: its vdso differs from this kernel's (dumped on {kernel}, "
            f"this is {os.uname().release}); restore on the same kernel build"
        )


def _offsets(layout: dict[str, tuple[int, int]]) -> dict[str, int]:
    base = layout["[vdso]"][0]
    return {k: s - base for k, (s, _) in layout.items()}


CHUNK = 4 << 20


def piece_data(piece: Piece):
    """(address, bytes) chunks of a piece with data (at most CHUNK bytes each)."""
    assert piece.source is not None
    for addr in range(piece.start, piece.end, CHUNK):
        n = min(CHUNK, piece.end - addr)
        yield addr, piece.source.read_stream(piece.off + (addr - piece.start), n)
