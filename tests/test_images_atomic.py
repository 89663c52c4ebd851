"""Atomic commit, refusal to overwrite, incomplete dirs, file and dir modes."""

import os
import stat

import pytest

from checkpointer.errors import ImageError
from checkpointer.images import Dump, DumpWriter
from checkpointer.images import samples as s
from checkpointer.images.inspect import show, verify


def _fill(w):
    w.write_pstree([s.pstree_rec(3)])
    w.write_core(3, s.process_rec(3), [s.thread_rec(3)])
    w.write_mm(3, s.mm_rec(), [s.vma_rec(0x1000, 0x3000)])
    w.write_fds(3, [s.fd_rec(0)])  # every file of a final dump (verify.FINAL_DUMP_FILES)
    pw = w.open_pages("pid-3")
    pw.add_data(0x1000, b"\x01" * 4096)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_exception_inside_writer_leaves_nothing(tmp_path):
    final = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with DumpWriter(str(final)) as w:
            _fill(w)
            assert os.path.isdir(w.tmp_dir) and os.path.basename(w.tmp_dir).startswith(".d.tmp-")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_abort_and_no_commit_leave_nothing(tmp_path):
    w = DumpWriter(str(tmp_path / "d"))
    _fill(w)
    w.abort()
    with DumpWriter(str(tmp_path / "e")) as w:
        _fill(w)  # leaving the block without commit
    assert os.listdir(tmp_path) == []


def test_commit_modes_and_no_temp_left(tmp_path):
    old = os.umask(0)  # must not matter
    try:
        with DumpWriter(str(tmp_path / "sub" / "d")) as w:
            _fill(w)
            w.commit()
    finally:
        os.umask(old)
    d = tmp_path / "sub" / "d"
    assert _mode(d) == 0o700 and _mode(tmp_path / "sub") == 0o700
    for name in os.listdir(d):
        assert _mode(d / name) == 0o600, name
    assert os.listdir(tmp_path / "sub") == ["d"]
    assert Dump.open(str(d)).inventory["complete"] is True


def test_refuses_complete_and_nonempty_dirs(tmp_path):
    with DumpWriter(str(tmp_path / "d")) as w:
        _fill(w)
        w.commit()
    with pytest.raises(ImageError, match="already holds a complete dump"):
        DumpWriter(str(tmp_path / "d"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(ImageError, match="exists and is not empty"):
        DumpWriter(str(tmp_path / "junk"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageError, match="not a directory"):
        DumpWriter(str(tmp_path / "file"))


def test_a_symlink_as_the_dump_directory_is_named_as_one(tmp_path):
    """A dump replaces its directory by a rename, which a link cannot take: the
    line said "exists and is not a directory" of a link to an empty directory."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("link", "dangling"):
        with pytest.raises(ImageError, match="is a symbolic link; give the directory itself"):
            DumpWriter(str(tmp_path / name))
    assert os.listdir(tmp_path / "real") == []


@pytest.mark.parametrize("mode, expect", [(0o755, 0o700), (0o500, 0o500), (0o711, 0o700)])
def test_empty_dir_replaced_never_loosened(tmp_path, mode, expect):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, mode)
    with DumpWriter(str(d)) as w:
        _fill(w)
        w.commit()
    assert _mode(d) == expect
    os.chmod(d, 0o700)
    assert Dump.open(str(d)).pids == [3]


def test_incomplete_dir_refused_everywhere(tmp_path):
    w = DumpWriter(str(tmp_path / "d"))
    _fill(w)
    tmp = w.tmp_dir  # a crashed dump: files but no inventory
    for fn in (Dump.open, show, verify):
        with pytest.raises(ImageError, match="incomplete dump: no inventory"):
            fn(tmp)
    with pytest.raises(ImageError, match="incomplete dump"):
        DumpWriter(str(tmp_path / "e"), parent=os.path.join("..", os.path.basename(tmp)))
    w.abort()
