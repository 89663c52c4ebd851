"""Pseudo-terminals: read a master's pair (index, termios, window size, lock, packet
mode, the bytes queued in both directions), make a new pair, and make a terminal
the controlling one of a task (injected).

Queued bytes cannot be read without consuming them: `read_queues` reads them and
puts them back at once, through the same paths `new_pair` uses to queue them in a
new pair (see `_neutral`)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios
import time
from typing import NamedTuple

from checkpointer.kernel.inject import SyscallSession
from checkpointer.kernel.syscalls import NR_ioctl

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTLCK = 0x80045439
TIOCGPKT = 0x80045438
TIOCPKT = 0x5420
TIOCGPTPEER = 0x5441
# The line discipline's input buffer holds 4096 bytes, one kept free: TIOCSTI
# queues at most this many (more waits in the port's buffers, out of its reach).
INPUT_LIMIT = 4095
# The kernel queues a pty's output in buffers it allocates per write, charged
# against a limit of the pair: a large write is refused while room for small ones
# is left. A full queue that a program filled line by line did not fit back in
# 64 KiB writes (13824 of 19784 bytes); in writes of 256 bytes, the smallest
# buffer the kernel allocates, it fit back whole whatever the writes that filled it.
PUT_BACK_CHUNK = 256
PUT_BACK_WAIT = 0.5  # seconds without progress before output is left out
PTS_MAJORS = range(136, 144)  # UNIX98_PTY_SLAVE_MAJOR .. + UNIX98_PTY_MAJOR_COUNT
_INT = struct.Struct("<i")
_WINSIZE = struct.Struct("<HHHH")
TERMIOS_FIELDS = ("iflag", "oflag", "cflag", "lflag", "ispeed", "ospeed")


def pts_index(dev: int) -> int | None:
    """The pts number of a terminal device number (stat tty_nr, st_rdev), or None."""
    major = (dev >> 8) & 0xFFF
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return (major - 136) * 256 + minor if major in PTS_MAJORS else None


def read_settings(fd: int) -> dict:
    """{termios, winsize} of the terminal behind fd (ours): a slave, or a master
    (whose ioctls reach its slave's settings)."""
    attrs = termios.tcgetattr(fd)
    cc = bytes(c[0] if isinstance(c, bytes) else c for c in attrs[6])
    return {
        "termios": {**dict(zip(TERMIOS_FIELDS, attrs[:6], strict=True)), "cc": cc},
        "winsize": window_size(fd),
    }


def window_size(fd: int) -> list[int]:
    """[rows, cols, xpixel, ypixel] of the terminal behind fd."""
    return list(_WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))))


def set_termios(fd: int, t: dict) -> None:
    """The terminal settings of a read_settings()["termios"]."""
    attrs = [t[k] for k in TERMIOS_FIELDS] + [[bytes([c]) for c in t["cc"]]]
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def read_master(fd: int) -> dict:
    """{index, termios, winsize, locked, packet} of the pair behind a master fd
    (ours)."""
    return {
        "index": _pts_number(fd),
        **read_settings(fd),
        "locked": _INT.unpack(fcntl.ioctl(fd, TIOCGPTLCK, bytes(4)))[0],
        "packet": _INT.unpack(fcntl.ioctl(fd, TIOCGPKT, bytes(4)))[0],
    }


class InputRefused(Exception):
    """The slave's queued input cannot be read and put back (the reason)."""


class Queues(NamedTuple):
    output: bytes  # written to the slave, not read by the master (as it reads it)
    input: bytes  # written to the master, not read by the slave's readers
    statuses: int  # packet mode: the status bits a read reported
    not_put_back: int  # bytes at the end of output the pair did not take back


def read_queues(fd: int, can_inject: bool) -> Queues:
    """The bytes queued in the pair behind master fd `fd` (ours): the output after
    output processing, the input after input processing, and in packet mode the
    status bits a read reported. Both are read, then put back as new_pair queues
    them (same queues, line boundaries, no second echo). The input needs
    `can_inject` (TIOCSTI: CAP_SYS_ADMIN); without it, or over INPUT_LIMIT bytes,
    InputRefused is raised and nothing was taken.

    Canonical input is read after switching the line discipline to
    non-canonical mode (a partial line can then be read) and back; if the input is
    refused, the switch back makes everything queued read as one line."""
    packet = _INT.unpack(fcntl.ioctl(fd, TIOCGPKT, bytes(4)))[0]
    slave = _open_peer(fd)
    try:
        attrs = termios.tcgetattr(slave)
        queued = _drain_input_check(slave, attrs, can_inject)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)  # shared with the target's fd
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            output, statuses = _drain(fd, packet=bool(packet))
            inqueue = _drain(slave)[0] if queued else b""
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
        left = _queue(slave, attrs, output, inqueue)
    finally:
        os.close(slave)
    return Queues(output, inqueue, statuses, left)


def _open_peer(master: int) -> int:
    """The slave of a master, opened through it (O_NOCTTY, non-blocking), even
    locked: the lock is lifted for the open and set again."""
    locked = _INT.unpack(fcntl.ioctl(master, TIOCGPTLCK, bytes(4)))[0]
    if locked:
        fcntl.ioctl(master, TIOCSPTLCK, _INT.pack(0))
    try:
        flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        return fcntl.ioctl(master, TIOCGPTPEER, flags)
    finally:
        if locked:
            fcntl.ioctl(master, TIOCSPTLCK, _INT.pack(1))


def _drain_input_check(slave: int, attrs: list, can_inject: bool) -> int:
    """Leave the slave in non-canonical mode (every queued byte readable) and
    return how many bytes its line discipline holds; refuse (mode restored) what
    read_queues cannot put back."""
    if attrs[3] & termios.ICANON:
        raw = list(attrs)
        raw[3] &= ~termios.ICANON
        raw[6] = list(attrs[6])
        raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0
        termios.tcsetattr(slave, termios.TCSANOW, raw)
    queued = _INT.unpack(fcntl.ioctl(slave, termios.TIOCINQ, bytes(4)))[0]
    why = None
    if queued >= INPUT_LIMIT:
        why = f"{queued} bytes or more of input queued, over the {INPUT_LIMIT} a restore can queue"
    elif queued and not can_inject:
        why = f"{queued} bytes of input queued: putting them back needs CAP_SYS_ADMIN (TIOCSTI)"
    if why:
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        raise InputRefused(why)
    return queued


def _drain(fd: int, packet: bool = False) -> tuple[bytes, int]:
    """Every byte queued for reading on a non-blocking terminal fd of ours; in
    packet mode, without the header bytes, and the status bits reported. (A read
    that finds nothing waits for the port's pending buffers first, so end of data
    is end of data.)"""
    data, statuses = bytearray(), 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno == errno.EIO:  # a master whose slave is closed: drained
                break
            raise
        if not chunk:
            break
        if packet:
            if chunk[0]:
                statuses |= chunk[0]  # a status report comes alone
                continue
            chunk = chunk[1:]
        data += chunk
    return bytes(data), statuses


_INPUT_TRANSLATION = (
    termios.ISTRIP | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IUCLC | termios.PARMRK
)
_ECHOES = (
    termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ECHOCTL
    | termios.ECHOKE | termios.ECHOPRT
)  # fmt: skip


def _neutral(attrs: list) -> list:
    """The slave's settings while queued bytes are put in again: no output
    processing, no echo, no signals, no input translation, and no editing
    characters, but the same canonical mode, so a newline (or EOL, EOL2) still ends
    a line. Flow control is left alone (changing it makes a packet-mode master
    report it)."""
    neutral = list(attrs)
    neutral[0] &= ~_INPUT_TRANSLATION
    neutral[1] &= ~termios.OPOST
    neutral[3] &= ~(_ECHOES | termios.ISIG)
    neutral[6] = list(attrs[6])
    for c in (termios.VERASE, termios.VKILL, termios.VEOF, termios.VWERASE, termios.VLNEXT,
              termios.VREPRINT):  # fmt: skip
        neutral[6][c] = b"\0" if isinstance(attrs[6][c], bytes) else 0
    return neutral


def _queue(slave: int, attrs: list, output: bytes, inqueue: bytes) -> int:
    """Queue output (written to the slave: the master reads it) and input (each
    byte through TIOCSTI, processed at once) under _neutral settings, then set
    `attrs` again. Returns how many bytes at the end of output did not fit."""
    if not (output or inqueue):
        return 0
    termios.tcsetattr(slave, termios.TCSANOW, _neutral(attrs))
    try:
        left = _put_back(slave, output)
        for byte in inqueue:
            fcntl.ioctl(slave, termios.TIOCSTI, bytes([byte]))
    finally:
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return left


def _put_back(slave: int, output: bytes) -> int:
    """Write output to a non-blocking slave in PUT_BACK_CHUNK pieces, waiting for
    room while the kernel moves queued bytes on to the master's side (a worker
    does it), until all is in or PUT_BACK_WAIT passes without progress; how many
    bytes are left out."""
    view = memoryview(output)
    deadline = time.monotonic() + PUT_BACK_WAIT
    while view and time.monotonic() < deadline:
        try:
            written = os.write(slave, view[:PUT_BACK_CHUNK])
        except BlockingIOError:
            written = 0
        if written:
            view = view[written:]
            deadline = time.monotonic() + PUT_BACK_WAIT
        else:
            time.sleep(0.001)
    return len(view)


def open_pair(index: int) -> tuple[int, int]:
    """A new pty pair (master, slave), numbered `index` if that number is free, else
    the lowest free one. The kernel gives the lowest free number: as CRIU does,
    the free ones below `index` are held open until it comes, then let go."""
    held: list[int] = []  # each a free number below `index`, lowest first
    try:
        while True:
            try:
                master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                if not held:
                    raise
                master = -1  # out of fds or terminals on the way up: the lowest one
                break
            got = _pts_number(master)
            if got >= index:
                break
            held.append(master)
        if got != index and held:  # taken (or not reached): the lowest free one
            if master >= 0:
                held.append(master)
            master = held.pop(0)
            got = _pts_number(master)
    finally:
        for fd in held:
            os.close(fd)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, _INT.pack(0))
        slave = os.open(f"/dev/pts/{got}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        raise
    return master, slave


def _pts_number(master: int) -> int:
    return _INT.unpack(fcntl.ioctl(master, TIOCGPTN, bytes(4)))[0]


def new_pair(state: dict, index: int) -> tuple[int, str, int]:
    """A new pty pair set as `state` (read_master's, with read_queues' `output`
    and `input` if any), numbered `index` if it is free (open_pair); (our master
    fd, slave path, bytes of output that did not fit)."""
    master, slave = open_pair(index)
    try:
        path = os.ttyname(slave)
        set_termios(master, state["termios"])
        fcntl.ioctl(master, termios.TIOCSWINSZ, _WINSIZE.pack(*state["winsize"]))
        os.set_blocking(slave, False)
        left = _queue(
            slave, termios.tcgetattr(slave), state.get("output", b""), state.get("input", b"")
        )
        if state.get("packet"):  # last: turning it on clears pending status reports
            fcntl.ioctl(master, TIOCPKT, _INT.pack(1))
        if state["locked"]:
            fcntl.ioctl(master, TIOCSPTLCK, _INT.pack(1))
    finally:
        os.close(slave)
    os.set_inheritable(master, False)
    return master, path, left


def set_foreground_in(s: SyscallSession, fd: int, pgid: int) -> None:
    """ioctl(fd, TIOCSPGRP, &pgid) in a task of the terminal's session."""
    addr = s.scratch()
    s.write(addr, _INT.pack(pgid))
    s.call(NR_ioctl, fd, termios.TIOCSPGRP, addr)


def take_as_controlling(s: SyscallSession, fd: int) -> None:
    """ioctl(fd, TIOCSCTTY, 0) in the task: a session leader without a controlling
    terminal makes the terminal at fd its own."""
    s.call(NR_ioctl, fd, termios.TIOCSCTTY, 0)
