"""restore of file locks: flock, POSIX (fcntl) and open-file-description locks
come back held by the same processes, on the same files and ranges; a lock that
another process took meanwhile makes the restore fail with one line."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
from objectslib import dump_and_kill, program_starter, refused_at_dump, restore
from targetlib import assert_one_line_error, cli

F_OFD_SETLK = 37
LOCKS = """
import fcntl, struct
F_OFD_SETLK = 37

def ofd_lock(fd, kind, start, length):
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhxxxxqqixxxx", kind, 0, start, length, 0))
"""


@pytest.fixture
def program(tmp_path):
    with program_starter(tmp_path, LOCKS) as start:
        yield start


def _conflicts(path, how: str, start: int = 0, length: int = 0) -> bool:
    """Would another process's lock of `how` conflict now?"""
    fd = os.open(path, os.O_RDWR)
    try:
        if how == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            lock = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, 0, start, length, 0)
            fcntl.fcntl(fd, F_OFD_SETLK, lock)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_flock_posix_and_ofd_locks_come_back(program, tmp_path):
    files = {name: tmp_path / name for name in ("flocked", "posix", "ofd", "free")}
    for path in files.values():
        path.write_bytes(bytes(4096))
    prog = program(
        f"""
        a = open("{files["flocked"]}", "r+b")
        fcntl.flock(a, fcntl.LOCK_EX)
        b = open("{files["posix"]}", "r+b")
        fcntl.lockf(b, fcntl.LOCK_EX, 100, 1000)  # bytes 1000-1099
        c = os.open("{files["ofd"]}", os.O_RDWR)
        ofd_lock(c, fcntl.F_RDLCK, 0, 0)  # whole file, shared
        d = open("{files["free"]}", "r+b")
        child = os.fork()  # shares a's description (and its flock): takes no lock again
        if child == 0:
            go()
            os._exit(0)
        ready()
        go()
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.lockf(b, fcntl.LOCK_UN, 100, 1000)
        ofd_lock(c, fcntl.F_UNLCK, 0, 0)
        os.waitpid(child, 0)
        report("unlocked", 1)
        time.sleep(1000)
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    assert _conflicts(files["flocked"], "flock")
    assert _conflicts(files["posix"], "range", 1050, 10)
    assert not _conflicts(files["posix"], "range", 0, 1000)  # outside the range
    assert _conflicts(files["ofd"], "range", 0, 0)  # a write lock against its read lock
    assert not _conflicts(files["free"], "flock")
    prog.go()
    prog.result("unlocked")
    for name in ("flocked", "ofd"):
        assert not _conflicts(files[name], "flock" if name == "flocked" else "range")
    assert not _conflicts(files["posix"], "range", 1050, 10)


def test_lock_taken_by_another_process_meanwhile_is_refused(program, tmp_path):
    path = tmp_path / "flocked"
    path.write_bytes(b"")
    prog = program(
        f"""
        a = open("{path}", "r+b")
        fcntl.flock(a, fcntl.LOCK_EX)
        ready()
        go()
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    with open(path, "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = cli("restore", "-D", str(tmp_path / "images"), "-d")
    assert_one_line_error(r, str(path), "lock", "held by another process")
    assert not os.path.exists(f"/proc/{prog.pid}")


def test_a_lease_is_refused_at_dump(program, tmp_path):
    path = tmp_path / "leased"
    path.write_bytes(b"")
    prog = program(
        f"""
        fd = os.open("{path}", os.O_RDONLY)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        report("fd", fd)
        ready()
        go()
        report("alive", 1)
        """
    )
    fd = int(prog.result("fd"))
    refused_at_dump(prog, tmp_path, f"fd {fd} of", "lease")


def test_a_flock_held_only_through_a_mapping_comes_back(program, tmp_path):
    """A flock lock whose fd was closed lives on in a mapping of the file, which
    holds the open file description: the JVM flocks its hsperfdata file, maps it
    MAP_SHARED and closes the fd; other JVMs take a file they can lock for a dead
    one's and delete it. Such a lock was dropped at restore without a word (only
    locks listed in an fd's fdinfo were dumped). It comes back held by the same
    process, through its mapping, and goes when the program unmaps the file."""
    locked, shared, free = (tmp_path / n for n in ("locked", "shared", "free"))
    for path in (locked, shared, free):
        path.write_bytes(bytes(8192))
    prog = program(
        f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        def mapped(path, how):  # Python's mmap would keep a dup of the fd
            fd = os.open(path, os.O_RDWR)
            if how:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
            addr = libc.mmap(None, 8192, 3, 1, fd, 0)  # PROT_READ|WRITE, MAP_SHARED
            os.close(fd)
            return addr
        a = mapped("{locked}", fcntl.LOCK_EX)
        b = mapped("{shared}", fcntl.LOCK_SH)
        c = mapped("{free}", 0)
        ready()
        go()
        libc.munmap(ctypes.c_void_p(a), 8192)  # the description's last holder: the lock goes
        report("unmapped", 1)
        time.sleep(1000)
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    assert _conflicts(locked, "flock")
    assert _conflicts(shared, "flock")  # a shared lock refuses an exclusive one
    assert not _conflicts(free, "flock")
    assert f" FLOCK  ADVISORY  WRITE {prog.pid} " in open("/proc/locks").read()
    prog.go()
    prog.result("unmapped")
    assert not _conflicts(locked, "flock")
