"""Pseudo-terminals: read a master's pair (index, termios, window size, lock),
make a new pair, and make a terminal the controlling one of a task (injected)."""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import NR_ioctl

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTLCK = 0x80045439
PTS_MAJORS = range(136, 144)  # UNIX98_PTY_SLAVE_MAJOR .. + UNIX98_PTY_MAJOR_COUNT
_INT = struct.Struct("<i")
_WINSIZE = struct.Struct("<HHHH")
TERMIOS_FIELDS = ("iflag", "oflag", "cflag", "lflag", "ispeed", "ospeed")


def pts_index(dev: int) -> int | None:
    """The pts number of a terminal device number (stat tty_nr, st_rdev), or None."""
    major = (dev >> 8) & 0xFFF
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return (major - 136) * 256 + minor if major in PTS_MAJORS else None


def read_master(fd: int) -> dict:
    """{index, termios, winsize, locked} of the pair behind a master fd (ours);
    termios and window size are the slave side's (the master's ioctls reach it)."""
    index = _INT.unpack(fcntl.ioctl(fd, TIOCGPTN, bytes(4)))[0]
    locked = _INT.unpack(fcntl.ioctl(fd, TIOCGPTLCK, bytes(4)))[0]
    attrs = termios.tcgetattr(fd)
    cc = bytes(c[0] if isinstance(c, bytes) else c for c in attrs[6])
    winsize = list(_WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))))
    return {
        "index": index,
        "termios": {**dict(zip(TERMIOS_FIELDS, attrs[:6], strict=True)), "cc": cc},
        "winsize": winsize,
        "locked": locked,
    }


def new_pair(state: dict) -> tuple[int, str]:
    """A new pty pair set as `state` (read_master's); (our master fd, slave path)."""
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        t = state["termios"]
        attrs = [t[k] for k in TERMIOS_FIELDS] + [[bytes([c]) for c in t["cc"]]]
        termios.tcsetattr(master, termios.TCSANOW, attrs)
        fcntl.ioctl(master, termios.TIOCSWINSZ, _WINSIZE.pack(*state["winsize"]))
        if state["locked"]:
            fcntl.ioctl(master, TIOCSPTLCK, _INT.pack(1))
    finally:
        os.close(slave)
    os.set_inheritable(master, False)
    return master, path


def set_foreground_in(s: SyscallSession, fd: int, pgid: int) -> None:
    """ioctl(fd, TIOCSPGRP, &pgid) in a task of the terminal's session."""
    addr = s.scratch()
    s.write(addr, _INT.pack(pgid))
    s.call(NR_ioctl, fd, termios.TIOCSPGRP, addr)


def take_as_controlling(s: SyscallSession, fd: int) -> None:
    """ioctl(fd, TIOCSCTTY, 0) in the task: a session leader without a controlling
    terminal makes the terminal at fd its own."""
    s.call(NR_ioctl, fd, termios.TIOCSCTTY, 0)
