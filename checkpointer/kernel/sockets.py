"""Pipes and sockets: the few kernel calls that read and rebuild them.

Pipes are read with tee(2), which copies buffered data without consuming it.
Sockets are described through copies of the target's fds (pidfd_getfd) and
sock_diag netlink (what no getsockopt tells: a unix socket's peer, a listener's
backlog). TCP connections are read and rebuilt in repair mode (TCP_REPAIR).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
from dataclasses import dataclass

from checkpointer.kernel.syscalls import NR_pidfd_getfd, NR_pidfd_open, syscall

NR_tee = 276
SPLICE_F_NONBLOCK = 2
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
FIONREAD = 0x541B

# -- fds of other processes -------------------------------------------------------------


def copy_fd(pid: int, fd: int) -> int:
    """A copy of fd `fd` of process `pid` in this process (pidfd_getfd), close-on-exec.
    It refers to the same open file: a socket copied this way is the target's socket."""
    try:
        return _getfd(syscall(NR_pidfd_open, pid, 0), fd)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
    # The main thread exited (it has no fd table any more) while others run on:
    # ask one of them, they share the table.
    tids = [int(t) for t in sorted(os.listdir(f"/proc/{pid}/task"), key=int) if int(t) != pid]
    for tid in tids:
        try:
            return _getfd(syscall(NR_pidfd_open, tid, PIDFD_THREAD), fd)
        except OSError:
            continue
    # Before 6.9 a pidfd names a process only (no PIDFD_THREAD): a pipe can still be
    # opened anew through a live thread's fd link (a socket cannot).
    for tid in tids:
        try:
            return os.open(
                f"/proc/{pid}/task/{tid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError:
            continue
    raise OSError(errno.ESRCH, f"no live thread of process {pid} holds fd {fd}")


PIDFD_THREAD = os.O_EXCL


def _getfd(pidfd: int, fd: int) -> int:
    try:
        return syscall(NR_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def fd_inode(pid: int, fd: int) -> int:
    return os.stat(f"/proc/{pid}/fd/{fd}").st_ino


def holders_of(link: str, *, exclude: set[int]) -> list[tuple[int, int]]:
    """(pid, fd) of every process not in `exclude` with an fd whose link reads `link`
    ("pipe:[123]"): who outside a tree still holds an object."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") == link:
                    found.append((int(name), int(fd)))
        except OSError:
            continue  # exited, or not ours to read
    return found


# -- pipes ------------------------------------------------------------------------------


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


def set_pipe_size(fd: int, size: int) -> None:
    fcntl.fcntl(fd, F_SETPIPE_SZ, size)


def bytes_queued(fd: int) -> int:
    """FIONREAD: bytes waiting to be read on a pipe or socket."""
    buf = ctypes.c_int()
    fcntl.ioctl(fd, FIONREAD, buf)
    return buf.value


def peek_pipe(pid: int, fd: int, with_data: bool) -> tuple[int, bytes]:
    """(size, buffered bytes) of the pipe at fd `fd` of `pid`, which keeps its data:
    a copy of the fd (pidfd_getfd: no open, so no permission check on a pipe
    another user made) is tee()d into a pipe of ours. `with_data` only for a
    read end (tee reads from one)."""
    src = copy_fd(pid, fd)
    try:
        size = pipe_size(src)
        queued = bytes_queued(src) if with_data else 0
        if not queued:
            return size, b""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            set_pipe_size(w, size)
            copied = syscall(NR_tee, src, w, size, SPLICE_F_NONBLOCK)
            data = os.read(r, copied)
            if len(data) != queued:
                raise OSError(errno.EIO, f"tee copied {len(data)} of {queued} bytes")
            return size, data
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(src)


# -- sockets ----------------------------------------------------------------------------


SO_PEEK_OFF = 42

# Socket options a dump reads and a restore sets again (when not the new socket's
# own value): record key -> (level, option), by the sockets they apply to. Numbers
# from the kernel's uapi headers (the socket module lacks some).
SOL_IP, SOL_IPV6, SOL_TCP = socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.IPPROTO_TCP
COMMON_OPTIONS = {
    "timestamp": (socket.SOL_SOCKET, 29),  # SO_TIMESTAMP
    "priority": (socket.SOL_SOCKET, 12),  # SO_PRIORITY
}
UNIX_OPTIONS = {
    **COMMON_OPTIONS,
    "passcred": (socket.SOL_SOCKET, 16),  # SO_PASSCRED: rsyslog, journald, dbus
}
INET_OPTIONS = {
    **COMMON_OPTIONS,
    "reuseaddr": (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    "reuseport": (socket.SOL_SOCKET, socket.SO_REUSEPORT),
    "keepalive": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "broadcast": (socket.SOL_SOCKET, socket.SO_BROADCAST),
    "oobinline": (socket.SOL_SOCKET, 10),  # SO_OOBINLINE
    # IP_PKTINFO: a wildcard UDP server (dnsmasq) learns each query's interface
    "pktinfo": (SOL_IP, 8),
    "recverr": (SOL_IP, 11),  # IP_RECVERR
    "freebind": (SOL_IP, 15),  # IP_FREEBIND
    "tos": (SOL_IP, 1),  # IP_TOS
}
INET6_OPTIONS = {
    "v6only": (SOL_IPV6, socket.IPV6_V6ONLY),
    "recvpktinfo": (SOL_IPV6, 49),  # IPV6_RECVPKTINFO
    "recverr6": (SOL_IPV6, 25),  # IPV6_RECVERR
    "tclass": (SOL_IPV6, 67),  # IPV6_TCLASS
}
TCP_OPTIONS = {
    "nodelay": (SOL_TCP, socket.TCP_NODELAY),
    "keepidle": (SOL_TCP, 4),
    "keepintvl": (SOL_TCP, 5),
    "keepcnt": (SOL_TCP, 6),
    "defer_accept": (SOL_TCP, 9),
    "user_timeout": (SOL_TCP, 18),
    "fastopen": (SOL_TCP, 23),  # a listener's queue length
    "notsent_lowat": (SOL_TCP, 25),
}
ALL_OPTIONS = {**UNIX_OPTIONS, **INET_OPTIONS, **INET6_OPTIONS, **TCP_OPTIONS}


def read_options(sock: socket.socket, options: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The options of `options` that this socket answers for."""
    values = {}
    for key, (level, name) in options.items():
        try:
            values[key] = sock.getsockopt(level, name)
        except OSError:
            pass  # not this kind of socket's (an IP option of a v6-only socket)
    return values


def options_of(family: int, type_: int, proto: int) -> dict[str, tuple[int, int]]:
    """The options a dump keeps for a socket of this family, type and protocol."""
    if family == socket.AF_UNIX:
        return UNIX_OPTIONS
    options = dict(INET_OPTIONS)
    if family == socket.AF_INET6:
        options.update(INET6_OPTIONS)
    if type_ == socket.SOCK_STREAM and proto == socket.IPPROTO_TCP:
        options.update(TCP_OPTIONS)
    return options


MAX_PEEKED_MESSAGES = 1 << 16  # far above any unix receive queue (net.unix.max_dgram_qlen)


def peek_messages(
    sock: socket.socket, shut_for_reading: bool
) -> list[tuple[bytes, bytes | str | None]]:
    """(bytes, sender address) of every message queued on a datagram or seqpacket
    socket, none consumed: SO_PEEK_OFF makes each MSG_PEEK read the next one. The
    socket's own peek offset is put back. A socket shut for reading answers an
    empty queue with end of file, not EAGAIN: there an empty read ends the list
    (a zero-length message queued on it cannot be told from the end)."""
    old = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    out = []
    try:
        while len(out) < MAX_PEEKED_MESSAGES:
            try:
                data, _, flags, sender = sock.recvmsg(
                    1 << 20, 0, socket.MSG_PEEK | socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return out
            if flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, "a queued message is over 1 MiB")
            if not data and shut_for_reading:
                return out
            out.append((data, sender or None))
        raise OSError(errno.EMSGSIZE, f"over {MAX_PEEKED_MESSAGES} messages queued")
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)


def socket_of(fd: int) -> socket.socket:
    """A socket object over our fd `fd` (family, type and protocol asked from the
    kernel); closing it closes fd."""
    return socket.socket(fileno=fd)


# -- netlink ----------------------------------------------------------------------------

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_LIST_MEMBERSHIPS = 1, 9
# Per-socket flags, each an int option of SOL_NETLINK, by record key.
NETLINK_FLAGS = {
    "pktinfo": 3, "broadcast_error": 4, "no_enobufs": 5, "listen_all_nsid": 8,
    "cap_ack": 10, "ext_ack": 11, "get_strict_chk": 12,
}  # fmt: skip
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def netlink_groups(sock: socket.socket) -> list[int]:
    """The multicast groups (numbers from 1) a netlink socket has joined, all of
    them: getsockname() shows only the first 32."""
    raw = sock.getsockopt(SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, 1024)
    bits = int.from_bytes(raw, "little")
    return [n + 1 for n in range(len(raw) * 8) if bits >> n & 1]


def join_netlink_group(sock: socket.socket, group: int) -> None:
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)


def netlink_flags(sock: socket.socket) -> dict[str, int]:
    """The netlink flags this kernel knows (an older one lacks the newer)."""
    flags = {}
    for name, opt in NETLINK_FLAGS.items():
        try:
            flags[name] = sock.getsockopt(SOL_NETLINK, opt)
        except OSError:
            continue
    return flags


def set_netlink_flag(sock: socket.socket, name: str, value: int) -> None:
    sock.setsockopt(SOL_NETLINK, NETLINK_FLAGS[name], value)


def buffer_sizes(sock: socket.socket) -> tuple[int, int]:
    """(receive, send) buffer sizes as the kernel holds them (twice what was asked)."""
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


def set_buffer_sizes(sock: socket.socket, rcvbuf: int, sndbuf: int) -> None:
    """Give the socket these (kernel-held) buffer sizes: the kernel doubles what is
    asked. The FORCE options pass net.core.[rw]mem_max, as a program that raised
    its buffer past it with privilege had; without CAP_NET_ADMIN, the capped ones."""
    for force, plain, size in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size // 2)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size // 2)


def has_data(sock: socket.socket) -> bool:
    """Something is waiting to be read (poll)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 1, 2, 4, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN = 0, 1, 2, 4
UNIX_DIAG_SHUTDOWN = 6
# sk_shutdown bits: shut for reading, for writing. A unix stream or seqpacket socket
# whose peer closed has both.
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2
SHUTDOWN_MASK = RCV_SHUTDOWN | SEND_SHUTDOWN


@dataclass
class UnixDiag:
    inode: int
    type: int
    state: int
    peer: int  # inode of the peer, 0 for none
    queued: int  # bytes (stream) waiting to be read; a listener: connections waiting
    backlog: int  # a listener's maximum backlog
    shutdown: int  # RCV_SHUTDOWN | SEND_SHUTDOWN bits
    # (inode, device) of the file a socket bound to a path made, wherever that file
    # is now (renamed, or removed); None for a socket not bound to a path
    file: tuple[int, int] | None = None


def _diag_query(payload: bytes, dump: bool = True) -> list[bytes]:
    """One SOCK_DIAG_BY_FAMILY request (a dump of many, or one exact socket): the
    bodies of the answers."""
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        header = struct.pack("=LHHLL", 16 + len(payload), SOCK_DIAG_BY_FAMILY, flags, 1, 0)
        nl.sendto(header + payload, (0, 0))
        out = []
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("=LHHLL", data, off)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", data, off + 16)[0]
                    raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
                out.append(data[off + 16 : off + length])
                off += (length + 3) & ~3
            if not data or not dump:
                return out


def _attrs(body: bytes, start: int) -> dict[int, bytes]:
    attrs, off = {}, start
    while off + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, off)
        if length < 4:
            break
        attrs[kind] = body[off + 4 : off + length]
        off += (length + 3) & ~3
    return attrs


def unix_socket(inode: int) -> UnixDiag:
    """The unix socket with this inode: its peer and queues (sock_diag)."""
    show = UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN
    req = struct.pack("=BBHLLLLL", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, show,
                      0xFFFFFFFF, 0xFFFFFFFF)  # fmt: skip
    for body in _diag_query(req, dump=False):
        _, type_, state, _, ino = struct.unpack_from("=BBBBL", body)
        attrs = _attrs(body, 16)
        peer = struct.unpack("=L", attrs[UNIX_DIAG_PEER])[0] if UNIX_DIAG_PEER in attrs else 0
        rq, wq = struct.unpack("=LL", attrs.get(UNIX_DIAG_RQLEN, b"\0" * 8))
        shutdown = attrs.get(UNIX_DIAG_SHUTDOWN, b"\0")[0]
        file = _socket_file(attrs)
        return UnixDiag(ino, type_, state, peer, rq, wq, shutdown, file)
    raise OSError(errno.ENOENT, f"no unix socket with inode {inode}")


def unix_socket_files() -> set[tuple[int, int]]:
    """(inode, device) of every socket file a live unix socket is bound to here
    (a socket file no socket holds is stale: its program exited)."""
    req = struct.pack("=BBHLLLLL", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_VFS,
                      0xFFFFFFFF, 0xFFFFFFFF)  # fmt: skip
    files = (_socket_file(_attrs(body, 16)) for body in _diag_query(req))
    return {f for f in files if f is not None}


def _socket_file(attrs: dict[int, bytes]) -> tuple[int, int] | None:
    """The socket file's inode, and device (given as the kernel's dev_t: MAJ<<20|MIN)."""
    if UNIX_DIAG_VFS not in attrs:
        return None
    vfs_ino, kdev = struct.unpack("=LL", attrs[UNIX_DIAG_VFS])
    return vfs_ino, os.makedev(kdev >> 20, kdev & 0xFFFFF)


# inet_diag_msg: family, state, timer, retrans (4 bytes), inet_diag_sockid (48),
# then expires, rqueue, wqueue, uid, inode.
_IDIAG_WQUEUE, _IDIAG_INODE = 4 + 48 + 8, 4 + 48 + 16


def _tcp_diag_msg(family: int, state: int, inode: int) -> bytes | None:
    """inet_diag's record of the TCP socket with this inode, asked among those in
    `state` only; None if not found."""
    req = struct.pack("=BBBBL", family, socket.IPPROTO_TCP, 0, 0, 1 << state)
    req += b"\0" * 48  # inet_diag_sockid: any
    for body in _diag_query(req):
        if struct.unpack_from("=L", body, _IDIAG_INODE)[0] == inode:
            return body
    return None


def tcp_listen_backlog(family: int, inode: int) -> int | None:
    """The backlog a TCP listener was given (inet_diag's wqueue), None if not found."""
    body = _tcp_diag_msg(family, TCP_LISTEN, inode)
    return None if body is None else struct.unpack_from("=L", body, _IDIAG_WQUEUE)[0]


def tcp_destination(family: int, inode: int) -> tuple[str, int] | None:
    """Where a connecting TCP socket (SYN_SENT) is connecting to: getpeername
    refuses until it is connected; inet_diag tells. None if not found."""
    body = _tcp_diag_msg(family, TCP_SYN_SENT, inode)
    if body is None:
        return None
    port = struct.unpack_from("!H", body, 6)[0]  # idiag_dport
    raw = body[24:40] if family == socket.AF_INET6 else body[24:28]  # idiag_dst
    return socket.inet_ntop(family, raw), port


# -- TCP repair -------------------------------------------------------------------------

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_CLOSE, TCP_LISTEN = 1, 2, 7, 10
TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_CLOSING = 4, 9, 11
SIOCOUTQ = 0x5411


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


# struct tcp_info: u32 tcpi_segs_out, tcpi_segs_in after the u64 bytes_received.
_TCPI_SEGS = 136


def tcp_segments(sock: socket.socket) -> int:
    """Segments the socket has sent and received (TCP_INFO): none for one that was
    never connected, which is how a bound socket in CLOSE is told from one whose
    connection ended."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_SEGS + 8)
    if len(info) < _TCPI_SEGS + 8:
        return 0  # a kernel before 4.2: no counters (a closed socket reads as unbound)
    out, in_ = struct.unpack_from("=II", info, _TCPI_SEGS)
    return out + in_


def set_repair(sock: socket.socket, mode: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, mode)


def leave_repair(sock: socket.socket, reuseaddr: int) -> None:
    """Out of repair mode, with the socket's own SO_REUSEADDR put back: the kernel
    forces reuse while in repair mode and resets it to none when leaving it. Without
    it, the connection's FIN_WAIT or TIME_WAIT, once closed, keeps its port from a
    restarted server's bind for a minute, SO_REUSEADDR or not."""
    set_repair(sock, TCP_REPAIR_OFF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuseaddr)


def _peek_queue(sock: socket.socket, queue: int, size: int) -> bytes:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    if size == 0:
        return b""
    data = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != size:
        raise OSError(errno.EIO, f"read {len(data)} of {size} queued bytes")
    return data


def read_tcp_repair_state(sock: socket.socket) -> dict:
    """Sequence numbers, queued data, options and window of a connection in repair
    mode (the caller turned it on): what rebuild_tcp needs."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    options, wscale = info[5], info[6]
    in_queue = bytes_queued(sock.fileno())
    out = ctypes.c_int()
    fcntl.ioctl(sock.fileno(), SIOCOUTQ, out)
    # SIOCOUTQ counts a sent FIN not yet acked as a byte (it takes a sequence number).
    unacked_fin = info[0] in (TCP_FIN_WAIT1, TCP_CLOSING, TCP_LAST_ACK) and out.value > 0
    state = {
        "recv_queue": _peek_queue(sock, TCP_RECV_QUEUE, in_queue),
        "recv_seq": sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ),
        "send_queue": _peek_queue(sock, TCP_SEND_QUEUE, out.value - unacked_fin),
        "send_seq": sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ),
        "mss": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG),
        "timestamps": bool(options & TCPI_OPT_TIMESTAMPS),
        "sack": bool(options & TCPI_OPT_SACK),
        "wscale": [wscale & 0xF, wscale >> 4] if options & TCPI_OPT_WSCALE else None,
        "timestamp": sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF,
        "window": list(struct.unpack("=5L", sock.getsockopt(socket.IPPROTO_TCP,
                                                             TCP_REPAIR_WINDOW, 20))),
    }  # fmt: skip
    for seq in ("recv_seq", "send_seq"):
        state[seq] &= 0xFFFFFFFF
    return state


def before_fins(st: dict, peer_fin: bool, own_fin: bool) -> dict:
    """The repair state of a connection as it was before the FINs it had received
    (`peer_fin`) and sent (`own_fin`), each one sequence number: repair mode can
    only rebuild an established connection; inject_fin and shutdown(SHUT_WR) then
    send them again."""
    recv_seq = (st["recv_seq"] - peer_fin) & 0xFFFFFFFF
    send_seq = (st["send_seq"] - own_fin) & 0xFFFFFFFF
    window = list(st["window"])
    if window[4] == st["recv_seq"]:  # rcv_wup may not lie beyond rcv_nxt
        window[4] = recv_seq
    return {**st, "recv_seq": recv_seq, "send_seq": send_seq, "window": window}


def inject_fin(local: tuple, peer: tuple, st: dict) -> None:
    """Deliver to the rebuilt connection `local` <-> `peer` (st: before_fins' state)
    the FIN its peer sent before the dump, as a segment from the peer on a raw
    socket: the kernel then moves it to CLOSE_WAIT and its reader gets end of file.
    The peer, in FIN_WAIT2, takes the ACK this draws as a duplicate."""
    ack = (st["send_seq"] - len(st["send_queue"])) & 0xFFFFFFFF  # what it has acked
    src, dst = _wire_address(peer[0]), _wire_address(local[0])
    tcp = struct.pack("!HHIIBBHHH", peer[1], local[1], st["recv_seq"], ack, 5 << 4,
                      _TH_FIN | _TH_ACK, 65535, 0, 0)  # fmt: skip
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                             socket.IPPROTO_TCP, 0, src, dst)  # fmt: skip
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        family, to = socket.AF_INET, (socket.inet_ntop(socket.AF_INET, dst), 0)
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
        header = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, src, dst)
        family, to = socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, dst), 0)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    # IPPROTO_RAW: the caller writes the IP header (IPv4 and IPv6 alike).
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + tcp, to)


_TH_FIN, _TH_ACK = 0x01, 0x10


def _wire_address(host: str) -> bytes:
    """An address as it travels: an IPv4-mapped IPv6 address travels as IPv4."""
    if ":" not in host:
        return socket.inet_pton(socket.AF_INET, host)
    packed = socket.inet_pton(socket.AF_INET6, host)
    return packed[12:] if packed[:12] == b"\0" * 10 + b"\xff\xff" else packed


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def rebuild_tcp(sock: socket.socket, local: tuple, peer: tuple, st: dict) -> None:
    """Make `sock` (fresh, same family) the connection `local` <-> `peer` with the
    state read_tcp_repair_state read; it is left in repair mode (leave_repair ends it)."""
    tcp = socket.IPPROTO_TCP
    set_repair(sock, TCP_REPAIR_ON)  # also lets bind reuse the listener's port
    # The sequence numbers read are those after the queued bytes; writing the
    # queues back below advances them again.
    for queue, seq, data in ((TCP_RECV_QUEUE, "recv_seq", "recv_queue"),
                             (TCP_SEND_QUEUE, "send_seq", "send_queue")):  # fmt: skip
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, queue)
        sock.setsockopt(tcp, TCP_QUEUE_SEQ, _signed32((st[seq] - len(st[data])) & 0xFFFFFFFF))
    sock.bind(local)
    sock.connect(peer)  # in repair mode: straight to ESTABLISHED, nothing sent
    opts = [(TCPOPT_MSS, st["mss"])]
    if st["wscale"] is not None:
        opts.append((TCPOPT_WINDOW, st["wscale"][0] | st["wscale"][1] << 16))
    if st["sack"]:
        opts.append((TCPOPT_SACK_PERM, 0))
    if st["timestamps"]:
        opts.append((TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(tcp, TCP_REPAIR_OPTIONS, b"".join(struct.pack("=LL", *o) for o in opts))
    if st["timestamps"]:
        sock.setsockopt(tcp, TCP_TIMESTAMP, _signed32(st["timestamp"]))
    # Queued bytes stay in the new socket's buffers (repair mode sends nothing):
    # room is made for them first. The dumped connection's buffers had grown (up
    # to net.ipv4.tcp_wmem's 4 MiB) where a new socket starts at 16 KiB, and a
    # write beyond that waited forever.
    _room_for(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, len(st["recv_queue"]))
    _room_for(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, len(st["send_queue"]))
    sock.settimeout(QUEUE_WRITE_TIMEOUT)  # a full buffer fails, never hangs
    for queue, data in ((TCP_RECV_QUEUE, st["recv_queue"]), (TCP_SEND_QUEUE, st["send_queue"])):
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, queue)
        view = memoryview(data)
        while view:
            view = view[sock.send(view) :]
    sock.settimeout(None)
    # After the queues: the kernel checks the window against rcv_nxt.
    sock.setsockopt(tcp, TCP_REPAIR_WINDOW, struct.pack("=5L", *st["window"]))


QUEUE_WRITE_TIMEOUT = 10.0  # seconds


def _room_for(sock: socket.socket, size_opt: int, force_opt: int, queued: int) -> None:
    """A buffer that holds `queued` bytes with their packets' overhead (the kernel
    keeps twice the size asked for); left as it is if it does already."""
    if queued and sock.getsockopt(socket.SOL_SOCKET, size_opt) < 2 * queued + (1 << 17):
        sock.setsockopt(socket.SOL_SOCKET, force_opt, queued + (1 << 16))


def _signed32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v
