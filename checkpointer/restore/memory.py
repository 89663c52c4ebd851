"""Step 3: replace the address space a process was cloned with by its dumped one.

A process is cloned from its parent once the parent's memory is rebuilt (the
root from the seed, a fork of ours, or from a template: template.py), so it
starts with a copy-on-write image of that memory; the private memory it shared
with its parent is kept (inherit.py). In order: drop the inherited rseq
registration (unmapping a registered area makes every return to user space
fault), close the fds, unmap everything but the kept ranges and the vdso and
vvar areas, move those to their dumped addresses (all together: the vdso finds
its data at a fixed offset), map the rest of every VMA at its address with its
flags, give kept ranges their protection, drop the kept pages it does not hold,
write the pages resolved through the parent chain into /proc/PID/mem (which
writes through read-only protections; in kept ranges only the pages that
differ), apply madvise flags, and set the mm fields and the exe with
PR_SET_MM_MAP.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import resource

from checkpointer.errors import ImageError
from checkpointer.images.resolve import Piece
from checkpointer.kernel import memfd, ptrace, taskctl
from checkpointer.kernel.memory import MemReader, MemWriter
from checkpointer.kernel.syscalls import NR_mmap, NR_munmap, syscall
from checkpointer.pageruns import normalize, subtract, within
from checkpointer.restore import inherit, pagefeed
from checkpointer.restore.ghosts import GhostFiles
from checkpointer.restore.images import (
    CHUNK,
    DELETED,
    VDSO_NAMES,
    RestoreError,
    RestoreImages,
    dumped_vdso_layout,
    own_vdso_layout,
)
from checkpointer.restore.sysvshm import SysvSegments
from checkpointer.restore.task import Task

log = logging.getLogger("checkpointer")
PAGE = os.sysconf("SC_PAGE_SIZE")
TASK_SIZE = 0x7FFFFFFFF000
SCRATCH_SIZE = 4 * PAGE
ANON_KINDS = ("anon", "heap", "stack")
SKIPPED_KINDS = ("vdso", "vvar", "vsyscall", "special")
PROT_BITS = {"r": 1, "w": 2, "x": 4}
MADV_DONTNEED = 4
# smaps VmFlags that a madvise() (or mlock) sets again.
# VmFlags -> madvise advice. The huge-page advice goes before the pages are written:
# the page size is chosen as each page is first faulted in (a region that was backed
# by transparent huge pages came back in 4 KiB pages, and a MADV_NOHUGEPAGE one in
# huge pages under THP "always"); the rest after.
PAGE_SIZE_ADVICE = {"hg": 14, "nh": 15}
MADVISE = {"rr": 1, "sr": 2, "mg": 12, "dd": 16, "dc": 10, "wf": 18}


def prot_of(vma: dict) -> int:
    return sum(bit for ch, bit in PROT_BITS.items() if ch in vma["prot"][:3])


FDS_BESIDE_OBJECTS = 1024  # the restorer's other fds: images, sockets, pidfds...


def _room_for_our_fds(objects: int) -> None:
    """The restorer may hold an fd per shared object until every process has
    mapped it: raise its own open-file limit to fit, as far as it may (the hard
    one too, with CAP_SYS_RESOURCE). Restored processes get their own limits back
    at the end."""
    need = objects + FDS_BESIDE_OBJECTS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
    except (OSError, ValueError):  # unprivileged: as far as the hard limit goes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class SharedObjects:
    """Each shared memory object of the dump (shared anonymous memory, a memfd),
    made once in the restorer, filled from the images, and mapped into (or, for a
    memfd, reopened by) every process that holds it; with the SysV segments and
    the deleted files, also made once and shared."""

    def __init__(self, images: RestoreImages) -> None:
        self.images = images
        self.fds: dict[str, int] = {}
        self.ghosts = GhostFiles(images)
        self.sysv = SysvSegments(images)
        # Every object's mappings and memfd fds, found in one pass (a tree may hold
        # tens of thousands of objects: a pass per object was quadratic).
        self._vmas: dict[str, list[dict]] = {}
        self._memfds: dict[str, list[dict]] = {}
        for p in images.processes:
            for v in p.vmas:
                if v["shmem"]:
                    self._vmas.setdefault(v["shmem"], []).append(v)
            for f in p.fds:
                if "memfd" in f:
                    self._memfds.setdefault(f["memfd"]["owner"], []).append(f["memfd"])
        # Uses left of each object: its fd is closed after the last (the restorer
        # may not have an fd to spare for each of tens of thousands at once).
        self._uses_left = {
            owner: len(self._vmas.get(owner, [])) + len(self._memfds.get(owner, []))
            for owner in {*self._vmas, *self._memfds}
        }
        _room_for_our_fds(len(self._uses_left))

    def fd(self, owner: str) -> int:
        """The object's fd, made (and filled) at its first use; say used() after."""
        if owner not in self.fds:
            self.fds[owner] = self._create(owner)
        return self.fds[owner]

    def used(self, owner: str) -> None:
        """One mapping or memfd fd of the object was made: after the last, its fd
        goes (a forked child's fd shares its parent's, so some are never counted
        down: those stay open until close())."""
        self._uses_left[owner] -= 1
        if self._uses_left[owner] == 0 and owner in self.fds:
            os.close(self.fds.pop(owner))

    def _create(self, owner: str) -> int:
        vmas = self._vmas.get(owner, [])
        memfds = self._memfds.get(owner, [])
        if memfds:  # an fd tells its size, name and seals
            m = memfds[0]
            fd = memfd.new_memfd(m["name"], m["size"], m["seals"])
        else:
            size = _object_size(vmas)
            if vmas[0]["kind"] == "memfd":
                fd = memfd.new_memfd(vmas[0]["path"].removeprefix("/memfd:"), size, 0)
            else:
                fd = _new_shared_anon(size)
        pagefeed.write_pieces(pagefeed.file_sink(fd), self.images.pieces.get(owner, []))
        if memfds:
            memfd.add_seals(fd, memfds[0]["seals"])
        return fd

    def every_process_has_them(self) -> None:
        """Deleted files are unlinked again, removed segments removed again."""
        self.ghosts.unlink_all()
        self.sysv.keep()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.ghosts.unlink_all()
        self.sysv.close()  # what a failed restore made


def _new_shared_anon(size: int) -> int:
    """An fd for a new shared anonymous object (what mmap(MAP_SHARED|MAP_ANONYMOUS)
    creates: /dev/zero (deleted) in maps), through our own map_files entry."""
    addr = syscall(NR_mmap, 0, size, 3, 0x21, (1 << 64) - 1, 0)
    try:
        return os.open(f"/proc/self/map_files/{addr:x}-{addr + size:x}", os.O_RDWR | os.O_CLOEXEC)
    finally:
        syscall(NR_munmap, addr, size)


def rebuild(
    task: Task, pieces: list[Piece], shared: SharedObjects | None, set_mm: bool = True
) -> None:
    """The task's memory as its image describes it, its pages from `pieces`; shared
    None: the image has no shared mappings and no deleted files (a template's)."""
    s = task.session
    image = task.image
    cfg = ptrace.get_rseq_config(task.pid)
    if cfg["ptr"]:
        taskctl.rseq_unregister(s, cfg["ptr"], cfg["size"], cfg["sig"])
    taskctl.close_all_fds(s)
    source = task.cloned_from
    # A clone of the seed has our layout; a clone of a rebuilt task has its.
    current = source.vdso if source else own_vdso_layout()
    lo = min(a for a, _ in current.values())
    hi = max(b for _, b in current.values())
    kept = inherit.kept_ranges(image, source.image if source else None)
    kept_spans = [(r.start, r.end) for r in kept]
    for start, end in subtract([(0, TASK_SIZE)], normalize(kept_spans + [(lo, hi)])):
        taskctl.munmap(s, start, end - start)
    dumped = dumped_vdso_layout(image)
    busy = [(v["start"], v["end"]) for v in image.vmas] + [(lo, hi)]
    scratch = _gap(busy, SCRATCH_SIZE)
    # Shared: it cannot merge with a neighbouring private VMA of the image.
    flags = taskctl.MAP_SHARED | taskctl.MAP_ANONYMOUS | taskctl.MAP_FIXED_NOREPLACE
    try:  # executable, for call_many's batches (refused under memory-deny-write-execute)
        taskctl.mmap(s, scratch, SCRATCH_SIZE, taskctl.PROT_RWX, flags)
        executable = True
    except OSError:
        taskctl.mmap(s, scratch, SCRATCH_SIZE, 3, flags)
        executable = False
    s.adopt_scratch(scratch, SCRATCH_SIZE, executable=executable)
    task.scratch = (scratch, SCRATCH_SIZE)
    if dumped:
        _move_vdso(task, current, dumped, busy + [(scratch, scratch + SCRATCH_SIZE)])
    task.vdso = dumped or current
    files: dict[str, int] = {}
    task.pieces = pieces
    try:
        batch: list[tuple[dict, tuple]] = []  # mmap alone makes these: a batch at a time
        for vma in image.vmas:
            if vma["kind"] in SKIPPED_KINDS:
                continue
            ours = within(kept_spans, vma["start"], vma["end"])
            if ours == [(vma["start"], vma["end"])]:
                continue  # kept whole
            args = _mmap_args(task, vma, shared, files)
            if args is not None:  # what it does not keep of it
                whole = [(vma["start"], vma["end"])]
                batch += [(vma, _part(args, a, b)) for a, b in subtract(whole, ours)]
                continue
            _map_batch(task, batch)
            batch = []
            _map_shared(task, vma, shared)
        _map_batch(task, batch)
        if shared is not None:
            _take_mapping_locks(task, shared, files)
        for r, vma in _kept_with_other_protection(kept, image.vmas):
            taskctl.mprotect(s, r.start, r.end - r.start, prot_of(vma))
        if kept:
            for start, end in inherit.pages_to_drop(kept_spans, pieces, source.pieces):
                taskctl.madvise(s, start, end - start, MADV_DONTNEED)
        for vma in image.vmas:
            _advise(task, vma, PAGE_SIZE_ADVICE)
        _write_pages(task, pieces, kept_spans, source.pieces if kept else [])
        for vma in image.vmas:
            _advise(task, vma, MADVISE)
            _lock(task, vma)
        if set_mm:
            _set_mm(task, shared)
    finally:
        for fd in files.values():
            taskctl.close(s, fd)


def _gap(busy: list[tuple[int, int]], size: int, start: int = 1 << 32) -> int:
    """The lowest page-aligned address >= start where `size` bytes touch nothing busy."""
    addr = start
    for lo, hi in sorted(busy):
        if hi <= addr:
            continue
        if lo >= addr + size:
            break
        addr = -(-hi // PAGE) * PAGE
    return addr


def _move_vdso(task, current: dict, dumped: dict, busy: list) -> None:
    """Move [vvar], [vvar_vclock], [vdso] together to their dumped addresses."""
    s = task.session
    delta = dumped["[vdso]"][0] - current["[vdso]"][0]
    if delta == 0:
        return
    lo = min(a for a, _ in current.values())
    hi = max(b for _, b in current.values())
    if lo + delta < hi and lo < hi + delta:  # overlapping: go through a free spot
        spot = _gap(busy + [(lo + delta, hi + delta)], hi - lo)
        _shift(s, current, spot - lo)
        current = {k: (a + spot - lo, b + spot - lo) for k, (a, b) in current.items()}
        delta -= spot - lo
    _shift(s, current, delta)


def _shift(s, layout: dict, delta: int) -> None:
    for name in VDSO_NAMES:
        if name in layout:
            start, end = layout[name]
            taskctl.mremap_to(s, start, end - start, start + delta)
            if name == "[vdso]":
                s.insn += delta  # the syscall instruction moved with it


def _mmap_args(
    task: Task, vma: dict, shared: SharedObjects, files: dict[str, int]
) -> tuple[int, int, int, int, int, int] | None:
    """mmap's arguments for an anonymous or file mapping of the image (its file
    opened in the task first, once per file); None for the other kinds."""
    start, length, prot = vma["start"], vma["end"] - vma["start"], prot_of(vma)
    kind = vma["kind"]
    if kind in ANON_KINDS:
        kind_of_map = taskctl.MAP_DROPPABLE if "dp" in vma["vmflags"] else taskctl.MAP_PRIVATE
        flags = kind_of_map | taskctl.MAP_ANONYMOUS | taskctl.MAP_FIXED
        if "gd" in vma["vmflags"]:
            flags |= taskctl.MAP_GROWSDOWN
        if "nr" in vma["vmflags"]:
            flags |= taskctl.MAP_NORESERVE
        return (start, length, prot, flags, -1, 0)
    if kind not in ("file", "file-private"):
        return None
    key, writable, path = _file_of(vma, shared)
    if key not in files:
        ours = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            files[key] = task.install_fd(ours)
        finally:
            os.close(ours)
    shared_map = vma["prot"][3] == "s"
    flags = (taskctl.MAP_SHARED if shared_map else taskctl.MAP_PRIVATE) | taskctl.MAP_FIXED
    return (start, length, prot, flags, files[key], vma["offset"])


def _file_of(vma: dict, shared: SharedObjects) -> tuple[str, bool, str]:
    """(key, opened for writing, path) of the file a file mapping maps: one fd of
    the task per key makes all its mappings of that file."""
    # A shared mapping of a file opened for writing may be made writable later
    # (VM_MAYWRITE, "mw"), though it is not now: it needs the file open read-write.
    writable = vma["prot"][3] == "s" and ("w" in vma["prot"] or "mw" in vma["vmflags"])
    path = shared.ghosts.path(vma["ghost"], vma["path"]) if "ghost" in vma else vma["path"]
    return f"{'w' if writable else 'r'}:{path}", writable, path


def _take_mapping_locks(task: Task, shared: SharedObjects, files: dict[str, int]) -> None:
    """The flock locks the process held through nothing but a mapping (vma
    "locks"), taken on the fd its mappings of the file were made with: the same
    open file description, which holds the lock once the fd is closed."""
    for vma in task.image.vmas:
        locks = [lk for lk in vma.get("locks") or () if lk.get("kind") == "flock"]
        if not locks:
            continue
        key, _, path = _file_of(vma, shared)
        fd = files.get(key)
        if fd is None:  # kept from the process it was cloned from: not its own file
            log.warning(
                "process %d: its flock lock on %s, held through a mapping inherited at "
                "restore, is not taken again", task.pid, path,
            )  # fmt: skip
            continue
        try:
            taskctl.flock(task.session, fd, bool(locks[0].get("write")))
        except OSError as exc:
            held = exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
            raise RestoreError(
                f"process {task.pid}: the flock lock it held through its mapping of {path} "
                + ("is held by another process now" if held else f"failed: {exc.strerror}")
            ) from None


def _part(args: tuple, lo: int, hi: int) -> tuple:
    """mmap's arguments for [lo, hi) of the mapping `args` make (its file offset moved)."""
    start, _, prot, flags, fd, offset = args
    return (lo, hi - lo, prot, flags, fd, offset + lo - start if fd >= 0 else 0)


def _kept_with_other_protection(kept: list, vmas: list[dict]):
    """(kept range, its mapping) where the source had another protection."""
    starts = [v["start"] for v in vmas]
    for r in kept:
        vma = vmas[bisect.bisect_right(starts, r.start) - 1]
        if r.prot[:3] != vma["prot"][:3]:
            yield r, vma


def _map_batch(task: Task, batch: list[tuple[dict, tuple]]) -> None:
    """Make the mappings of `batch` ((vma, mmap arguments) pairs) in a few stops."""
    if not batch:
        return
    results = taskctl.mmap_many(task.session, [args for _, args in batch])
    for (vma, args), result in zip(batch, results, strict=True):
        if result != args[0]:
            why = os.strerror(-result) if result < 0 else f"mapped at {result:#x} instead"
            raise RestoreError(
                f"process {task.pid}: cannot map {vma['start']:#x}-{vma['end']:#x} "
                f"({vma['path'] or vma['kind']}): {why}"
            )


def _map_shared(task: Task, vma: dict, shared: SharedObjects) -> None:
    """Map a shared anonymous, memfd or SysV mapping: its object is the tree's."""
    s = task.session
    start, length, prot = vma["start"], vma["end"] - vma["start"], prot_of(vma)
    kind = vma["kind"]
    if vma["shmem"] is not None and kind in ("shared-anon", "memfd"):
        fd = task.install_fd(shared.fd(vma["shmem"]))
        try:
            taskctl.mmap(s, start, length, prot, taskctl.MAP_SHARED | taskctl.MAP_FIXED, fd,
                         vma["offset"])  # fmt: skip
        finally:
            taskctl.close(s, fd)
        shared.used(vma["shmem"])
    elif kind == "shm" and "sysv" in vma:
        shared.sysv.attach(task, vma)
    else:
        raise RestoreError(
            f"process {task.pid}: cannot restore a {kind} mapping at {start:#x} ({vma['path']})"
        )


def _write_pages(task: Task, pieces: list[Piece], kept: list, theirs: list[Piece]) -> None:
    """Every page the images hold for the process, through /proc/PID/mem; in the
    ranges it kept from the task it was cloned from (`kept`; `theirs`: that task's
    pieces), only those that differ from what it holds already."""
    vmas = task.image.vmas
    starts = [v["start"] for v in vmas]
    kept_ends = [hi for _, hi in kept]
    data: list[Piece] = []
    inherited: list[Piece] = []
    with MemWriter(task.pid) as writer:
        for piece in pieces:
            for lo, hi, vma in _split_by_vma(piece.start, piece.end, vmas, starts, task.pid):
                if vma["kind"] in SKIPPED_KINDS:
                    continue  # the vdso is this kernel's own (checked equal)
                if piece.source is not None:
                    for a, b, in_kept in _split_by_ranges(lo, hi, kept, kept_ends):
                        part = Piece(a, b, piece.source, piece.off + (a - piece.start))
                        (inherited if in_kept else data).append(part)
                elif vma["kind"] not in ANON_KINDS:
                    # Fresh anonymous memory reads as zeros already (and a kept
                    # mapping's pages that are not were dropped); a zero page of
                    # a file mapping is a private copy the file does not hold.
                    for addr in range(lo, hi, CHUNK):
                        writer.write(addr, bytes(min(CHUNK, hi - addr)))
        pagefeed.write_pieces(writer.write, data)
        inherited = inherit.differing(inherited, theirs)
        if inherited:
            with MemReader(task.pid) as reader:
                sink = pagefeed.changed_pages_sink(reader, writer.write)
                pagefeed.write_pieces(sink, inherited)
        task.bytes_written = writer.written


def _split_by_ranges(lo: int, hi: int, ranges: list[tuple[int, int]], ends: list[int]):
    """[lo, hi) in parts, each (start, end, inside one of `ranges`: sorted, apart;
    `ends`: theirs)."""
    i = bisect.bisect_right(ends, lo)
    while lo < hi and i < len(ranges) and ranges[i][0] < hi:
        a, b = ranges[i]
        if a > lo:
            yield lo, a, False
        yield max(a, lo), min(b, hi), True
        lo = min(b, hi)
        i += 1
    if lo < hi:
        yield lo, hi, False


def _split_by_vma(lo: int, hi: int, vmas: list, starts: list, pid: int):
    while lo < hi:
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or vmas[i]["end"] <= lo:
            raise ImageError(f"pages at {lo:#x} of process {pid} lie outside every mapping")
        end = min(hi, vmas[i]["end"])
        yield lo, end, vmas[i]
        lo = end


def _advise(task: Task, vma: dict, advice_of: dict[str, int]) -> None:
    if vma["kind"] in SKIPPED_KINDS:
        return
    start, length = vma["start"], vma["end"] - vma["start"]
    for flag, advice in advice_of.items():
        if flag in vma["vmflags"]:
            taskctl.madvise(task.session, start, length, advice)


def _object_size(vmas: list[dict]) -> int:
    """The size the mapped object had (its file's, as map_files/ showed it): a
    mapping grown by mremap past it faults there (SIGBUS). As far as the mappings
    reach where the dump did not record it."""
    recorded = (vmas[0].get("stat") or {}).get("size")
    if isinstance(recorded, int) and 0 <= recorded < 1 << 47:
        return recorded
    return max(v["offset"] + v["end"] - v["start"] for v in vmas)


def _lock(task: Task, vma: dict) -> None:
    if vma["kind"] not in SKIPPED_KINDS and "lo" in vma["vmflags"]:
        on_fault = "lf" in vma["vmflags"]  # mlock2(MLOCK_ONFAULT): only what is in
        taskctl.mlock(task.session, vma["start"], vma["end"] - vma["start"], on_fault)


def _set_mm(task: Task, shared: SharedObjects) -> None:
    mm = task.image.mm
    exe_fd = (1 << 32) - 1
    exe = _exe_path(task, shared)
    # The exe is inherited from the task it was cloned from (the seed's is ours);
    # changing it is refused (EBUSY) while the old one is mapped, which it is when
    # the process runs the same program.
    if exe and not _same_file(exe, f"/proc/{task.pid}/exe"):
        ours = os.open(exe, os.O_RDONLY | os.O_CLOEXEC)
        try:
            exe_fd = task.install_fd(ours)
        finally:
            os.close(ours)
    try:
        taskctl.set_mm_map(task.session, mm, mm["auxv"], exe_fd)
    except OSError as exc:
        raise RestoreError(f"process {task.pid}: PR_SET_MM_MAP refused: {exc.strerror}") from None
    finally:
        if exe_fd != (1 << 32) - 1:
            taskctl.close(task.session, exe_fd)


def _exe_path(task: Task, shared: SharedObjects) -> str | None:
    """Where the exe is now: its path, or, deleted since it started (a binary
    upgraded under a running program), the ghost its mapping was recreated from."""
    exe = task.image.mm.get("exe")
    if not exe or not exe.endswith(DELETED):
        return exe
    path = exe.removesuffix(DELETED)
    for vma in task.image.vmas:
        if vma.get("path") == path and "ghost" in vma:
            return shared.ghosts.path(vma["ghost"], path)
    return exe  # not mapped: missing (preflight said so)


def _same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def unmap_scratch(task: Task) -> None:
    if task.scratch:
        taskctl.munmap(task.session, *task.scratch)
        task.scratch = None
