"""restore of inotify fds: the watches come back under their own watch
descriptors, on the same files, and report events; what cannot be dumped is
refused at dump, naming the fd."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time

import pytest
from objectslib import dump_and_kill, program_starter, refused_at_dump, restore
from targetlib import assert_one_line_error, cli

INOTIFY = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY, IN_CREATE, IN_IGNORED = 0x2, 0x100, 0x8000

def events(fd):
    out, buf = [], os.read(fd, 4096)
    while buf:
        wd, mask, _, size = struct.unpack_from("iIII", buf)
        name = buf[16:16 + size].rstrip(b"\\0").decode()
        out.append((wd, mask, name))
        buf = buf[16 + size:]
    return out
"""


@pytest.fixture
def program(tmp_path):
    with program_starter(tmp_path, INOTIFY) as start:
        yield start


def test_watches_keep_their_descriptors_and_report_events(program, tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "file").write_bytes(b"")
    (watched / "gone").write_bytes(b"")
    prog = program(
        f"""
        fd = libc.inotify_init1(0)
        w_file = libc.inotify_add_watch(fd, b"{watched}/file", IN_MODIFY)
        w_gone = libc.inotify_add_watch(fd, b"{watched}/gone", IN_MODIFY)
        w_dir = libc.inotify_add_watch(fd, b"{watched}", IN_CREATE)
        libc.inotify_rm_watch(fd, w_gone)
        assert events(fd) == [(w_gone, IN_IGNORED, "")]
        report("wds", [w_file, w_dir])
        ready()
        go()
        report("events", events(fd))
        """
    )
    assert prog.result("wds") == b"[1, 3]"
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    with open(watched / "file", "ab") as f:
        f.write(b"x")
    (watched / "new").write_bytes(b"")
    time.sleep(0.1)
    prog.go()
    # Only the events after the restore: none of the restorer's own add/remove.
    assert prog.result("events") == b"[(1, 2, ''), (3, 256, 'new')]"


@pytest.mark.parametrize("stopped_before", [False, True])
def test_tail_follows_the_file_after_restore(tmp_path, stopped_before):
    """GNU tail -f waits on inotify for the file to grow, in poll(), which the
    kernel resumes through a restart block: restored with EINTR (as CRIU does), tail
    gave up. Stopped and resumed once before (by a dump --leave-running), it waits
    inside restart_syscall instead."""
    followed, out = tmp_path / "followed", tmp_path / "out"
    followed.write_bytes(b"before\n")
    with open(out, "wb") as o:
        p = subprocess.Popen(["tail", "-f", str(followed)], stdin=subprocess.DEVNULL, stdout=o,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _wait_for(out, b"before\n")
        assert "anon_inode:inotify" in [
            os.readlink(f"/proc/{p.pid}/fd/{n}") for n in os.listdir(f"/proc/{p.pid}/fd")
        ]
        if stopped_before:
            r = cli("dump", "-t", str(p.pid), "-D", str(tmp_path / "before"), "--leave-running")
            assert r.returncode == 0, r.stderr
            assert open(f"/proc/{p.pid}/syscall").read().split()[0] == "219"
        dump_and_kill(p.pid, tmp_path / "images", reap=lambda: p.wait(timeout=10))
        restore(tmp_path / "images")
        with open(followed, "ab") as f:
            f.write(b"after\n")
        _wait_for(out, b"before\nafter\n")
    finally:
        try:
            os.kill(p.pid, 9)
        except ProcessLookupError:
            pass


def _wait_for(path, data: bytes, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path.read_bytes() != data:
        assert time.monotonic() < deadline, path.read_bytes()
        time.sleep(0.02)


def test_a_watched_file_gone_at_restore_is_refused(program, tmp_path):
    watched = tmp_path / "file"
    watched.write_bytes(b"")
    prog = program(
        f"""
        fd = libc.inotify_init1(0)
        libc.inotify_add_watch(fd, b"{watched}", IN_MODIFY)
        ready()
        go()
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    watched.unlink()
    r = cli("restore", "-D", str(tmp_path / "images"), "-d")
    assert_one_line_error(r, "(inotify) watches", str(watched), "missing")


def test_an_fd_of_an_unknown_kind_is_refused_at_dump(program, tmp_path):
    """A userfaultfd of the program (anon_inode:[userfaultfd]) has no restore: the
    dump names it instead of writing images that a restore would refuse."""
    prog = program(
        """
        import ctypes
        uffd = ctypes.CDLL(None, use_errno=True).syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
        assert uffd >= 0, ctypes.get_errno()
        report("fd", uffd)
        ready()
        go()
        report("alive", 1)
        """
    )
    fd = int(prog.result("fd"))
    refused_at_dump(prog, tmp_path, f"fd {fd} of", "(anon_inode:[userfaultfd])", "cannot be dumped")


@pytest.mark.parametrize(
    "setup, words",
    [
        (
            # io_uring_setup(8 entries), its submission ring mapped, the fd closed:
            # the mapping alone keeps the ring (MariaDB's InnoDB holds one).
            """
            params = ctypes.create_string_buffer(120)
            fd = libc.syscall(425, 8, params)
            assert fd >= 0, ctypes.get_errno()
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
            assert libc.mmap(None, 4096, 3, 0x8001, fd, 0) not in (None, 2**64 - 1)
            os.close(fd)
            """,
            ("anon_inode:[io_uring]", "io_uring", "not supported"),
        ),
        (
            # io_setup(8, &ctx): a Linux AIO context, whose ring the kernel maps
            # as "/[aio] (deleted)" (libaio; MySQL's InnoDB)
            """
            ctx = ctypes.c_ulong(0)
            assert libc.syscall(206, 8, ctypes.byref(ctx)) == 0, ctypes.get_errno()
            """,
            ("/[aio]", "AIO", "not supported"),
        ),
    ],
    ids=["io_uring", "aio"],
)
def test_a_kernel_ring_mapping_is_refused_at_dump(program, tmp_path, setup, words):
    """Memory the kernel shares with a program for an I/O interface (io_uring's
    rings, an AIO context's ring) has no restore: a deleted file or a page of
    anonymous memory in its place would not be the kernel's ring. The dump names it
    instead of writing images that restore would get wrong."""
    prog = program(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        + textwrap.dedent(setup)
        + "ready()\ngo()\nreport('alive', 1)\n"
    )
    refused_at_dump(prog, tmp_path, "maps", *words)
