"""Sockets at restore: made in the restorer, then copied into the tasks.

unix: a connected pair inside the tree is a socketpair, the bytes each end had
waiting written back from the other end; a listener is bound to its path again
(a stale socket file left by the dumped process is replaced) with its mode and
backlog; a datagram socket is bound and connected to its names again.
netlink: bound to its port id and multicast groups, connected, flags set.
inet: listening and unconnected sockets are bound again with their options
(SO_REUSEADDR... before the bind, IPV6_V6ONLY) and backlog; an established TCP
connection (dumped with --tcp-established) is rebuilt in repair mode with its
sequence numbers, queues, options and window, and leaves repair mode in
finish(), where the netfilter rule that locked it since the dump is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat

from checkpointer.fdstate.tree import (
    OWN_FIN,
    PEER_FIN,
    REPAIRED,
    lift_locks,
    peer_closed,
    reuseaddr_of,
)
from checkpointer.kernel import sockets, syscalls
from checkpointer.restore.images import ProcessImage, RestoreError

FAMILIES = {
    "unix": socket.AF_UNIX,
    "inet": socket.AF_INET,
    "inet6": socket.AF_INET6,
    "netlink": socket.AF_NETLINK,
}
TYPES = {
    "stream": socket.SOCK_STREAM,
    "dgram": socket.SOCK_DGRAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "raw": socket.SOCK_RAW,
}
# The types restore makes of each family.
KINDS = {
    "unix": ("stream", "dgram", "seqpacket"),
    "inet": ("stream", "dgram"),
    "inet6": ("stream", "dgram"),
    "netlink": ("raw", "dgram"),
}


def _where(pid: int, record: dict) -> str:
    return f"fd {record['fd']} of process {pid} ({record['target']})"


def _record_of(files, inode: int) -> dict | None:
    """An fd record of the tree's socket `inode` (fds that share it agree)."""
    recs = files.records_by("sock_inode").get(inode)
    return recs[-1] if recs else None


def open(files, task, record: dict) -> int:  # noqa: A001 (the kind interface)
    where = _where(task.pid, record)
    try:
        ours = files.shared(f"sock-{record['sock_inode']}", lambda: _make(files, record))
        fd = os.dup(ours)
    except OSError as exc:
        raise RestoreError(f"{where}: {exc.strerror or exc}") from None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    nonblock = record["flags"] & os.O_NONBLOCK
    fcntl.fcntl(fd, fcntl.F_SETFL, (flags & ~os.O_NONBLOCK) | nonblock)
    return fd


def _make(files, record: dict) -> int:
    family, type_ = FAMILIES[record["sock_family"]], TYPES[record["sock_type"]]
    if family == socket.AF_UNIX:
        peer = _record_of(files, record.get("sock_peer", 0))
        if peer is not None and peer.get("sock_peer") == record["sock_inode"]:
            return _make_pair(files, record, peer, type_)
        if peer_closed(record):
            return _make_orphaned(record, type_)
        sock = socket.socket(family, type_)
        _set_options(sock, record)
        _unix(sock, record)
        if record.get("sock_peer_name") and not record["sock_listening"]:
            # Connected to a named socket: to one of the tree's, made first if need
            # be (a listener that had not accepted us yet), where its file is now
            # (renamed, or bound by a relative name); or to one outside (dgram).
            target = record["sock_peer_name"]
            for other in files.records_by("sock_name").get(record["sock_peer_name"], []):
                if other is not record:
                    files.shared(f"sock-{other['sock_inode']}", lambda o=other: _make(files, o))
                    target = _file_now(other)
            sock.connect(target)
    elif family == socket.AF_NETLINK:
        sock = socket.socket(family, type_, record["sock_protocol"])
        _netlink(sock, record)
    else:
        sock = socket.socket(family, type_, record.get("sock_protocol", 0))
        _inet(sock, record)
    return sock.detach()


def _make_pair(files, record: dict, peer: dict, type_: int) -> int:
    """Both ends of a connected pair at once (the peer's fd is kept for its own turn)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, type_)
    for rec, sock in ((record, ours), (peer, theirs)):
        _set_options(sock, rec)
    for rec, other in ((record, theirs), (peer, ours)):
        _send_queued(other, rec)  # what `rec`'s end had to read comes from the other end
    for rec, sock in ((record, ours), (peer, theirs)):
        _shut_down(sock, rec)
    files.objects[f"sock-{peer['sock_inode']}"] = theirs.detach()
    return ours.detach()


def _make_orphaned(record: dict, type_: int) -> int:
    """A socket whose peer closed: one end of a new pair, given its unread bytes by
    the other end, which is then closed (shutting ours both ways, as before)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, type_)
    _set_options(ours, record)
    with theirs:
        _send_queued(theirs, record)
    return ours.detach()


def _shut_down(sock: socket.socket, record: dict) -> None:
    """shutdown() as the record's end had it (of a pair: both ends' bits agree)."""
    how = {
        sockets.RCV_SHUTDOWN: socket.SHUT_RD,
        sockets.SEND_SHUTDOWN: socket.SHUT_WR,
        sockets.SHUTDOWN_MASK: socket.SHUT_RDWR,
    }.get(record.get("sock_shutdown", 0))
    if how is not None:
        sock.shutdown(how)


def _send_queued(sender: socket.socket, record: dict) -> None:
    """Queue again the bytes (stream) or messages the record's socket had to read."""
    sender.setblocking(False)
    if record.get("sock_data"):
        sender.sendall(record["sock_data"])
    for message in record.get("sock_messages") or []:
        sender.send(message)
    sender.setblocking(True)


def _unix(sock: socket.socket, record: dict) -> None:
    name = record.get("sock_name")
    on_path = name and not name.startswith(b"\0")
    if on_path and not record.get("sock_path_unlinked"):
        _remove_stale_socket_file(_socket_path(record))
    if on_path and record.get("sock_bind_dir"):
        # Bound by a relative name (what getsockname says) in the process's directory.
        syscalls.in_directory(record["sock_bind_dir"], lambda: sock.bind(name))
    elif name:
        sock.bind(name)
    if record["sock_listening"]:
        sock.listen(record.get("sock_backlog", 128))
    elif record.get("sock_messages"):  # unnamed senders (checked at dump)
        with socket.socket(socket.AF_UNIX, sock.type) as sender:
            sender.connect(_socket_path(record))
            _send_queued(sender, record)
    if on_path:
        _place_socket_file(record)


def _socket_path(record: dict) -> bytes:
    """Where binding the record's path name made its file (a relative name: in the
    directory it was bound in)."""
    return os.path.join(record.get("sock_bind_dir") or b"", record["sock_name"])


def _file_now(record: dict) -> bytes:
    """Where the program had put that file: renamed since its bind, or still there."""
    return record.get("sock_path_now") or _socket_path(record)


def _place_socket_file(record: dict) -> None:
    """The file the record's bind made, put where the program had put it (renamed
    or removed: fdstate/socket.py), with its owner and mode."""
    bound = _socket_path(record)
    if record.get("sock_path_unlinked"):
        os.unlink(bound)
        return
    path = _file_now(record)
    if path != bound:
        _remove_stale_socket_file(path)
        os.rename(bound, path)
    if "sock_path_owner" in record:  # the restorer made it: root's otherwise
        os.chown(path, *record["sock_path_owner"])
    if "sock_path_mode" in record:
        os.chmod(path, record["sock_path_mode"])


def _remove_stale_socket_file(path: bytes) -> None:
    """A socket file left by the dumped program, which no live socket holds, is
    removed; one a live socket is bound to (the program started again, or another)
    is that program's: refused, as a TCP port another program holds."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        return
    if (st.st_ino, st.st_dev) in sockets.unix_socket_files():
        raise RestoreError(
            f"{os.fsdecode(path)}: a live unix socket is bound to it now (another program's)"
        )
    os.unlink(path)


def _set_options(sock: socket.socket, record: dict) -> None:
    """The dumped options that are not the new socket's own value already (a
    default left alone stays a default: TCP keepalive times follow the sysctls)."""
    for name, value in record.get("sock_options", {}).items():
        level, opt = sockets.ALL_OPTIONS[name]
        if level == socket.IPPROTO_TCP and sock.type != socket.SOCK_STREAM:
            continue
        try:
            if sock.getsockopt(level, opt) == value:
                continue
        except OSError:
            pass
        sock.setsockopt(level, opt, value)


def _netlink(sock: socket.socket, record: dict) -> None:
    for name, value in record["nl_flags"].items():
        if value:
            sockets.set_netlink_flag(sock, name, value)
    sockets.set_buffer_sizes(sock, *record["sock_buffers"])
    groups = record["nl_groups"]
    if record["nl_portid"]:
        # bind() takes the first 32 groups as a mask; the rest are joined one by one.
        mask = sum(1 << (g - 1) for g in groups if g <= 32)
        sock.bind((record["nl_portid"], mask))
    for group in groups:
        if group > 32 or not record["nl_portid"]:
            sockets.join_netlink_group(sock, group)
    if any(record["nl_dst"]):
        sock.connect(tuple(record["nl_dst"]))


def _inet(sock: socket.socket, record: dict) -> None:
    local = tuple(record["sock_local"])
    state = record.get("tcp_state")
    _set_options(sock, record)  # before the bind: IPV6_V6ONLY cannot change after it
    if state in REPAIRED:  # rebuilt established; finish() sends the FINs again
        sockets.rebuild_tcp(sock, local, tuple(record["sock_peer_addr"]), _before_fins(record))
        return
    if state == "ended":
        # Over before the dump: unbound (its port is a listener's, or free), shut
        # both ways. Reads see end of file and writes EPIPE, as the original's did
        # (a reset's error, which only a destructive SO_ERROR could read, is lost).
        # shutdown() answers ENOTCONN for a socket never connected, but shuts it.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    if local[1] != 0:
        sock.bind(local)
    if state == "listen":
        sock.listen(record.get("sock_backlog", 128))
    elif state == "syn-sent":
        # A connect in progress (its SYN unanswered) starts again from its port:
        # a connect() the program was blocked in, issued again, waits for it; one
        # polled for (non-blocking) sees it complete.
        sock.setblocking(False)
        sock.connect_ex(tuple(record["sock_peer_addr"]))
    elif record.get("sock_peer_addr") and sock.type == socket.SOCK_DGRAM:
        sock.connect(tuple(record["sock_peer_addr"]))


def _before_fins(record: dict) -> dict:
    state = record["tcp_state"]
    return sockets.before_fins(record["tcp_repair"], state in PEER_FIN, state in OWN_FIN)


def finish(files, task, record: dict) -> None:
    """An established connection runs again: out of repair mode; then, once for
    the whole tree, the netfilter rules that locked them since the dump go. A
    connection whose peer had closed gets the peer's FIN again, once unlocked;
    one the program had shut for writing sends its own FIN again, after it."""
    if record.get("tcp_state") not in REPAIRED:
        return
    key = f"sock-{record['sock_inode']}"
    if key in files.objects:
        with socket.socket(fileno=os.dup(files.objects[key])) as sock:
            sockets.leave_repair(sock, reuseaddr_of(record))
    if files.first_time("netlock"):
        lift_locks(files.tree_fds)
    if not files.first_time(f"fin-{key}"):
        return
    if record["tcp_state"] in PEER_FIN:
        local, peer = tuple(record["sock_local"]), tuple(record["sock_peer_addr"])
        sockets.inject_fin(local, peer, _before_fins(record))
    if record["tcp_state"] in OWN_FIN and key in files.objects:
        with socket.socket(fileno=os.dup(files.objects[key])) as sock:
            sock.shutdown(socket.SHUT_WR)


def check(p: ProcessImage, record: dict, source_alive: bool = False) -> None:
    """Refuse a socket whose address is taken by another program, before anything
    of the tree exists. (A source still alive holds its own addresses: see
    images.preflight.)"""
    where = _where(p.pid, record)
    family, type_ = record.get("sock_family"), record.get("sock_type")
    if type_ not in KINDS.get(family, ()):
        raise RestoreError(f"{where}: a {family} {type_} socket cannot be restored")
    if family == "netlink":
        _check_netlink(where, record, source_alive)
        return
    if record["sock_family"] == "unix":
        name = record.get("sock_name")
        if not name or name.startswith(b"\0"):
            return
        name = _socket_path(record)
        if record.get("sock_path_unlinked") and os.path.lexists(name):
            raise RestoreError(
                f"{where}: {name.decode()} exists: the socket was bound there, its file "
                "removed since, and binding there again would take that file's place"
            )
        for path in {name, _file_now(record)}:
            if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise RestoreError(f"{where}: {path.decode()} exists and is not a socket")
        return
    _check_inet_fields(where, record)
    if source_alive:
        return
    if record.get("tcp_state") == "listen" or (
        record["sock_type"] == "dgram" and record["sock_local"][1] != 0
    ):
        _check_free(where, record)


# What a rebuilt TCP connection reads of its record (read_tcp_repair_state's).
REPAIR_FIELDS = {
    "recv_seq": int, "send_seq": int, "recv_queue": bytes, "send_queue": bytes,
    "mss": int, "timestamps": bool, "sack": bool, "timestamp": int, "window": list,
}  # fmt: skip


def _check_inet_fields(where: str, record: dict) -> None:
    """The fields an inet socket's restore reads, of the types it expects: a record
    of a damaged or hostile image is refused here, in one line, not met halfway."""

    def address(value) -> bool:
        return (isinstance(value, list) and len(value) >= 2 and isinstance(value[0], str)
                and type(value[1]) is int)  # fmt: skip

    bad = None
    if not address(record.get("sock_local")):
        bad = "sock_local"
    elif record.get("tcp_state") == "syn-sent" and not address(record.get("sock_peer_addr")):
        bad = "sock_peer_addr"
    elif record.get("tcp_state") in REPAIRED:
        st = record.get("tcp_repair")
        if not address(record.get("sock_peer_addr")):
            bad = "sock_peer_addr"
        elif not isinstance(st, dict):
            bad = "tcp_repair"
        else:
            for key, kind in REPAIR_FIELDS.items():
                if type(st.get(key)) is not kind:
                    bad = f"tcp_repair.{key}"
                    break
            else:
                window, wscale = st["window"], st.get("wscale")
                if len(window) != 5 or any(type(w) is not int for w in window):
                    bad = "tcp_repair.window"
                elif wscale is not None and not (
                    isinstance(wscale, list) and len(wscale) == 2
                    and all(type(w) is int for w in wscale)
                ):  # fmt: skip
                    bad = "tcp_repair.wscale"
    if bad:
        raise RestoreError(f"{where}: malformed socket record ({bad} missing or mistyped)")


def _check_netlink(where: str, record: dict, source_alive: bool) -> None:
    """Its fields, of the types restore reads; and its port id free (the dumped
    process's own, which a killed original released, or one the kernel picked)."""
    fields = {"sock_protocol": int, "nl_portid": int, "nl_groups": list, "nl_dst": list,
              "nl_flags": dict, "sock_buffers": list}  # fmt: skip
    for key, kind in fields.items():
        if type(record.get(key)) is not kind:
            raise RestoreError(f"{where}: malformed socket record ({key} missing or mistyped)")
    ints = [*record["nl_groups"], *record["nl_dst"], *record["sock_buffers"],
            *record["nl_flags"].values()]  # fmt: skip
    if (
        any(type(v) is not int for v in ints)
        or len(record["nl_dst"]) != 2
        or len(record["sock_buffers"]) != 2
        or not set(record["nl_flags"]) <= set(sockets.NETLINK_FLAGS)
    ):
        raise RestoreError(f"{where}: malformed socket record (a netlink field out of shape)")
    if source_alive or not record["nl_portid"]:
        return
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, record["sock_protocol"]) as probe:
            probe.bind((record["nl_portid"], 0))
    except OSError as exc:
        raise RestoreError(
            f"{where}: cannot bind netlink port id {record['nl_portid']}: {exc.strerror}"
        ) from None


def _check_free(where: str, record: dict) -> None:
    with socket.socket(FAMILIES[record["sock_family"]], TYPES[record["sock_type"]]) as probe:
        _set_options(probe, record)
        try:
            probe.bind(tuple(record["sock_local"]))
        except OSError as exc:
            host, port = record["sock_local"][:2]
            raise RestoreError(f"{where}: cannot bind {host} port {port}: {exc.strerror}") from None
