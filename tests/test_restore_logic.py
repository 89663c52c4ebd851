"""Pure logic of the restorer (no kernel involved): the syscall-restart fix-up,
finding a free gap, and resolving page runs through a chain of real images."""

from __future__ import annotations

import errno

import pytest

from checkpointer.errors import ImageError
from checkpointer.images import DumpWriter
from checkpointer.images.reader import Dump
from checkpointer.images.resolve import Piece, resolve
from checkpointer.restore.inherit import differing, kept_ranges, pages_to_drop
from checkpointer.restore.memory import _gap
from checkpointer.restore.threads import restart_fixup

U64 = (1 << 64) - 1


def regs(rax: int, orig: int, rip: int = 0x1000) -> dict:
    return {"rax": rax & U64, "orig_rax": orig & U64, "rip": rip}


@pytest.mark.parametrize("code", [512, 513, 514])
def test_restartable_syscall_is_issued_again(code):
    out = restart_fixup(regs(-code, 202))  # futex interrupted: -ERESTARTSYS...
    assert out["rax"] == 202 and out["rip"] == 0x1000 - 2


@pytest.mark.parametrize("orig", [7, 35, 202, 230])  # poll, nanosleep, futex, clock_nanosleep
def test_restart_block_syscall_is_issued_again(orig):
    """Its restart block stayed in the old task: issued again (EINTR, as CRIU
    returns, made GNU tail -f give up)."""
    out = restart_fixup(regs(-516, orig))
    assert out["rax"] == orig and out["rip"] == 0x1000 - 2


def test_restart_syscall_issues_the_syscall_its_code_names():
    code = bytes.fromhex("b807000000") + b"\x0f\x05"  # mov $7 (poll), %eax; syscall
    out = restart_fixup(regs(-516, 219), code)
    assert out["rax"] == 7 and out["rip"] == 0x1000 - 2


@pytest.mark.parametrize(
    "code", [b"", b"\x48\x89\xf8\x90\x90\x0f\x05", bytes.fromhex("b8db000000") + b"\x0f\x05"]
)
def test_restart_syscall_of_unknown_origin_gets_eintr(code):
    out = restart_fixup(regs(-516, 219), code)  # mov %rdi,%rax...: the number is not there
    assert out["rax"] == -errno.EINTR & U64 and out["rip"] == 0x1000


@pytest.mark.parametrize("rax, orig", [(-512, -1), (0, 35), (-errno.EINTR, 232), (7, 0)])
def test_other_states_are_left_alone(rax, orig):
    before = regs(rax, orig)
    assert restart_fixup(before) == before


def test_gap_skips_busy_ranges():
    page = 4096
    busy = [(1 << 32, (1 << 32) + 2 * page), ((1 << 32) + 3 * page, (1 << 32) + 9 * page)]
    assert _gap(busy, page) == (1 << 32) + 2 * page
    assert _gap(busy, 2 * page) == (1 << 32) + 9 * page


def _chain(tmp_path, second_runs):
    """Two dumps of pid 7: the first holds pages 0-3, the second `second_runs`."""
    ps = 4096
    base = 0x10000
    with DumpWriter(str(tmp_path / "1"), kind="pre-dump") as w:
        w.write_pstree([{"pid": 7, "ppid": 1, "pgid": 7, "sid": 7, "threads": [7]}])
        pages = w.open_pages("pid-7")
        pages.add_data(base, b"".join(bytes([i + 1]) * ps for i in range(4)))
        pages.close()
        w.commit()
    with DumpWriter(str(tmp_path / "2"), kind="pre-dump", parent="../1") as w:
        w.write_pstree([{"pid": 7, "ppid": 1, "pgid": 7, "sid": 7, "threads": [7]}])
        pages = w.open_pages("pid-7")
        for kind, first, n in second_runs:
            if kind == "parent":
                pages.add_parent(base + first * ps, n)
            elif kind == "zero":
                pages.add_zero(base + first * ps, n)
            else:
                pages.add_data(base + first * ps, bytes([0xEE]) * ps * n)
        pages.close()
        w.commit()
    return Dump.open(str(tmp_path / "2"))


def test_resolve_takes_each_page_from_the_newest_dump_that_holds_it(tmp_path):
    d = _chain(tmp_path, [("parent", 0, 1), ("here", 1, 1), ("zero", 2, 1), ("parent", 3, 1)])
    pieces = resolve(d, "pid-7")
    got = [(p.start, p.end, p.source.read_stream(p.off, 1)[0] if p.source else None)
           for p in pieces]  # fmt: skip
    base, ps = 0x10000, 4096
    assert got == [
        (base, base + ps, 1),
        (base + ps, base + 2 * ps, 0xEE),
        (base + 2 * ps, base + 3 * ps, None),
        (base + 3 * ps, base + 4 * ps, 4),
    ]


@pytest.mark.damages_images  # writes a chain with a hole on purpose
def test_resolve_refuses_a_parent_reference_no_ancestor_holds(tmp_path):
    d = _chain(tmp_path, [("parent", 3, 2)])  # page 4 was never in the parent
    with pytest.raises(ImageError, match="no ancestor holds them"):
        resolve(d, "pid-7")


@pytest.mark.parametrize(
    "filters",
    [5, "x", [5], [{"prog": b"x" * 7, "flags": 0}], [{"prog": b"", "flags": 0}],
     [{"prog": b"x" * 8, "flags": 1}], [{"prog": b"x" * 8 * 4097, "flags": 0}],
     [{"prog": "text", "flags": 0}]],
)  # fmt: skip
def test_a_malformed_seccomp_filter_is_an_image_error(filters):
    """A hostile image's filters: one line (ImageError), never a traceback."""
    from types import SimpleNamespace

    from checkpointer.restore.images import _check_seccomp

    thread = {"tid": 1, "seccomp_filters": filters}
    p = SimpleNamespace(pid=1, process={"seccomp": 2}, threads=[thread])
    with pytest.raises(ImageError, match="malformed seccomp filter"):
        _check_seccomp(p)


def _vma(start: int, end: int, kind: str = "anon", vmflags: str = "rd wr mr mw me ac", **kw):
    return {"start": start, "end": end, "prot": "rw-p", "kind": kind, "path": "",
            "offset": 0, "vmflags": vmflags, "shmem": None, **kw}  # fmt: skip


class _Image:
    def __init__(self, vmas):
        self.vmas = vmas


def test_a_child_keeps_the_private_memory_its_parent_has_alike():
    parent = _Image([
        _vma(0x1000, 0x5000),
        _vma(0x5000, 0x9000),
        _vma(0x9000, 0xA000, vmflags="rd wr mr mw me dc"),  # MADV_DONTFORK: not inherited
        _vma(0xA000, 0xB000, vmflags="rd wr mr mw me wf"),  # MADV_WIPEONFORK: zeros
        _vma(0xB000, 0xC000, kind="shared-anon", shmem="shmem-1"),
        _vma(0xC000, 0xD000, kind="file-private", path="/lib/x.so"),
        _vma(0xE000, 0x10000, prot="r--p"),
        _vma(0x10000, 0x12000, vmflags="rd wr mr mw me ac hg"),
    ])  # fmt: skip
    child = _Image([
        _vma(0x1000, 0x5000),  # the same: kept
        _vma(0x5000, 0x8000),  # shorter since the fork (munmap): what is left is kept
        _vma(0x9000, 0xA000, vmflags="rd wr mr mw me dc"),
        _vma(0xA000, 0xB000, vmflags="rd wr mr mw me wf"),
        _vma(0xB000, 0xC000, kind="shared-anon", shmem="shmem-1"),  # mapped again
        _vma(0xC000, 0xD000, kind="file-private", path="/lib/y.so"),  # another file
        _vma(0xD000, 0xF000),  # grown down into its parent's: the common page kept
        _vma(0xF000, 0x10000),  # mprotect split it: kept, its protection set again
        _vma(0x10000, 0x12000),  # no MADV_HUGEPAGE: restore would never clear it
    ])  # fmt: skip
    spans = [(r.start, r.end, r.prot) for r in kept_ranges(child, parent)]
    assert spans == [(0x1000, 0x5000, "rw-p"), (0x5000, 0x8000, "rw-p"),
                     (0xE000, 0xF000, "r--p"), (0xF000, 0x10000, "r--p")]  # fmt: skip
    child.vmas[5]["path"] = "/lib/x.so"
    assert (0xC000, 0xD000, "rw-p") in [tuple(r) for r in kept_ranges(child, parent)]
    child.vmas[5]["offset"] = 0x1000  # the same file, other offsets: other pages
    assert (0xC000, 0xD000, "rw-p") not in [tuple(r) for r in kept_ranges(child, parent)]
    assert kept_ranges(child, None) == []  # cloned from the seed: nothing to keep


def test_a_child_drops_the_pages_only_its_parent_holds_as_data():
    data, zero = object(), None
    parent = [Piece(0x1000, 0x4000, data, 0), Piece(0x6000, 0x8000, zero, 0)]
    child = [Piece(0x2000, 0x3000, data, 0), Piece(0x3000, 0x4000, zero, 0)]
    # The parent's zero pages and its data the child holds as zeros go too; the
    # kept mappings bound it all.
    kept = [(0x1000, 0x7000)]
    assert pages_to_drop(kept, child, parent) == [(0x1000, 0x2000), (0x3000, 0x4000),
                                                  (0x6000, 0x7000)]  # fmt: skip


def test_only_pieces_from_other_bytes_than_the_parents_are_compared():
    ours_file, theirs_file = object(), object()
    parent = [Piece(0x1000, 0x5000, theirs_file, 0), Piece(0x8000, 0x9000, theirs_file, 0x4000)]
    child = [
        Piece(0x0000, 0x3000, theirs_file, -0x1000),  # the parent's bytes from 0x1000 on
        Piece(0x3000, 0x4000, ours_file, 0),  # its own
        Piece(0x4000, 0x6000, theirs_file, 0x3000),  # the parent's up to its piece's end
        Piece(0x8000, 0x9000, theirs_file, 0x5000),  # same file, other bytes
    ]
    assert differing(child, parent) == [
        Piece(0x0000, 0x1000, theirs_file, -0x1000),
        Piece(0x3000, 0x4000, ours_file, 0),
        Piece(0x5000, 0x6000, theirs_file, 0x4000),
        Piece(0x8000, 0x9000, theirs_file, 0x5000),
    ]
