"""Sockets at dump: family, type, addresses, state, options and (unix streams)
the bytes waiting to be read, through a copy of the target's fd (pidfd_getfd).
TCP connections are only named here; their repair-mode state is read by
fdstate.tcp once every fd of the tree is known."""

from __future__ import annotations

import os
import socket
import stat

from checkpointer.errors import TargetError
from checkpointer.kernel import proc, sockets

FAMILIES = {
    socket.AF_UNIX: "unix",
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_NETLINK: "netlink",
    socket.AF_PACKET: "packet",
}
TYPES = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_SEQPACKET: "seqpacket",
    socket.SOCK_RAW: "raw",
}
TCP_STATES = dict(enumerate(
    ("?", "established", "syn-sent", "syn-recv", "fin-wait1", "fin-wait2", "time-wait",
     "close", "close-wait", "last-ack", "listen", "closing", "new-syn-recv"),
))  # fmt: skip


def describe(pid: int, record: dict) -> dict:
    where = f"fd {record['fd']} of process {pid} ({record['target']})"
    try:
        sock = sockets.socket_of(sockets.copy_fd(pid, record["fd"]))
    except OSError as exc:
        raise TargetError(f"{where}: cannot read the socket: {exc.strerror or exc}") from None
    with sock:
        fields = {
            "sock_inode": int(record["target"][len("socket:[") : -1]),
            "sock_family": FAMILIES.get(sock.family, str(int(sock.family))),
            "sock_type": TYPES.get(sock.type, str(int(sock.type))),
        }
        if sock.family == socket.AF_UNIX:
            fields.update(_unix(pid, sock, fields["sock_inode"]))
            fields["sock_options"] = sockets.read_options(
                sock, sockets.options_of(sock.family, sock.type, 0)
            )
            # File descriptors sent over it and not received yet, where fdinfo shows them.
            in_flight = proc.read_fdinfo(pid, record["fd"]).get("scm_fds")
            if in_flight and int(in_flight):
                fields["sock_scm_fds"] = int(in_flight)
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            fields["sock_protocol"] = sock.proto
            fields.update(_inet(sock, fields["sock_inode"]))
        elif sock.family == socket.AF_NETLINK:
            fields["sock_protocol"] = sock.proto
            fields.update(_netlink(sock))
        return fields


def _name(raw) -> bytes | None:
    """A unix address as bytes (abstract names start with NUL); None if unbound."""
    if not raw:
        return None
    return raw.encode() if isinstance(raw, str) else bytes(raw)


def _unix(pid: int, sock: socket.socket, inode: int) -> dict:
    diag = sockets.unix_socket(inode)
    listening = diag.state == sockets.TCP_LISTEN
    fields = {
        "sock_name": _name(sock.getsockname()),
        "sock_listening": listening,
        "sock_connected": diag.state == sockets.TCP_ESTABLISHED,
        "sock_peer": diag.peer,  # 0 also while a listener has not accepted us yet
        "sock_shutdown": diag.shutdown,
    }
    if listening:
        fields["sock_backlog"] = diag.backlog
    else:
        try:
            fields["sock_peer_name"] = _name(sock.getpeername())
        except OSError:
            fields["sock_peer_name"] = None
        queued = sockets.bytes_queued(sock.fileno())
        fields["sock_queued"] = queued
        if queued and sock.type == socket.SOCK_STREAM:
            fields["sock_data"] = sock.recv(queued, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        elif queued:
            messages = sockets.peek_messages(sock, bool(diag.shutdown & sockets.RCV_SHUTDOWN))
            fields["sock_messages"] = [data for data, _ in messages]
            fields["sock_senders"] = [_name(sender) for _, sender in messages]
    name = fields["sock_name"]
    if name and not name.startswith(b"\0"):
        cwd = proc.read_link(pid, "cwd") if not name.startswith(b"/") else None
        if cwd and not cwd.endswith(" (deleted)"):
            # A relative name was resolved in the process's working directory (at
            # its bind: taken to be the one it has now); restore binds it there.
            fields["sock_bind_dir"] = os.fsencode(cwd)
        at = os.path.join(fields.get("sock_bind_dir", b""), name)
        fields.update(_socket_file(at, diag.file))
    return fields


def _socket_file(name: bytes, file: tuple[int, int] | None) -> dict:
    """Where the file a socket bound to `name` made is now, and its mode. A program
    may rename it (the JVM's attach listener binds a temporary name, then renames
    it in its directory) or remove it (only its connections reach it then):
    `sock_path_now` or `sock_path_unlinked`. getsockname keeps the bound name."""
    here = _socket_file_at(name, file)
    if here is not None:
        return _mode_and_owner(here)
    if file is None:  # a kernel that does not say which file is the socket's
        return {}
    # The directory's entries carry their inode: no stat but of a match (a dump runs
    # frozen, and /tmp may hold thousands).
    try:
        with os.scandir(os.path.dirname(name) or b".") as entries:
            for entry in entries:
                if entry.inode() == file[0]:
                    there = _socket_file_at(entry.path, file)
                    if there is not None:
                        return {**_mode_and_owner(there), "sock_path_now": entry.path}
    except OSError:
        pass
    return {"sock_path_unlinked": True}


def _socket_file_at(path: bytes, file: tuple[int, int] | None) -> os.stat_result | None:
    """The socket file at path if it is that socket's (`file`: its inode and device;
    None where the kernel does not tell: any socket file at the name)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or (file is not None and (st.st_ino, st.st_dev) != file):
        return None
    return st


def _mode_and_owner(st: os.stat_result) -> dict:
    """A socket file's permission bits and owner: connecting needs write permission
    on it (an ssh agent's socket is its user's, mode 0600)."""
    return {"sock_path_mode": st.st_mode & 0o7777, "sock_path_owner": [st.st_uid, st.st_gid]}


def _netlink(sock: socket.socket) -> dict:
    """Port id (0 if never bound: the kernel binds one at the first send), every
    multicast group joined, where it is connected (port id, group mask), flags and
    buffer sizes. Messages queued unread are only noted: the dump refuses them."""
    portid, _ = sock.getsockname()
    dst_portid, dst_groups = sock.getpeername()
    rcvbuf, sndbuf = sockets.buffer_sizes(sock)
    return {
        "nl_portid": portid,
        "nl_groups": sockets.netlink_groups(sock),
        "nl_dst": [dst_portid, dst_groups],
        "nl_flags": sockets.netlink_flags(sock),
        "sock_buffers": [rcvbuf, sndbuf],
        "nl_unread": sockets.has_data(sock),
    }


def _inet(sock: socket.socket, inode: int) -> dict:
    fields: dict = {"sock_local": list(sock.getsockname()[:2])}
    options = sockets.read_options(sock, sockets.options_of(sock.family, sock.type, sock.proto))
    try:
        fields["sock_peer_addr"] = list(sock.getpeername()[:2])
    except OSError:
        fields["sock_peer_addr"] = None
    if sock.type == socket.SOCK_STREAM and sock.proto == socket.IPPROTO_TCP:
        state = sockets.tcp_state(sock)
        fields["tcp_state"] = TCP_STATES.get(state, str(state))
        if state == sockets.TCP_LISTEN:
            fields["sock_backlog"] = sockets.tcp_listen_backlog(sock.family, inode) or 128
        elif state == sockets.TCP_SYN_SENT:
            dst = sockets.tcp_destination(sock.family, inode)
            fields["sock_peer_addr"] = list(dst) if dst else None
        elif state == sockets.TCP_CLOSE and sockets.tcp_segments(sock):
            # A connection that is over (closed both ways, or reset) while the
            # program still holds its fd: it keeps the port it had (an accepted
            # one's is its listener's), which a restore must not bind again.
            fields["tcp_state"] = "ended"
            fields["sock_queued"] = sockets.bytes_queued(sock.fileno())
    fields["sock_options"] = options
    return fields
