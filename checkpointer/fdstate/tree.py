"""Checks and steps that need every fd of the tree at once: what is connected to
what, and established TCP connections (read in repair mode, locked)."""

from __future__ import annotations

import os
import socket

from checkpointer.errors import CheckpointError
from checkpointer.fdstate import anon
from checkpointer.kernel import netlock, proc, sockets

CAP_NET_ADMIN = 12

FAMILY_NUMBERS = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


def _where(pid: int, rec: dict) -> str:
    return f"fd {rec['fd']} of process {pid} ({rec['target']})"


def _endpoint(addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(records: dict[int, list[dict]], tcp_established: bool, pids: set[int]) -> None:
    """Refuse, naming the object, what a restore could not bring back. `pids`: the
    tree's processes, zombies too."""
    inodes = {r["sock_inode"] for recs in records.values() for r in recs if "sock_inode" in r}
    listeners = {
        r["sock_name"] for recs in records.values() for r in recs if r.get("sock_listening")
    }
    _check_epolls(records)
    for pid, recs in records.items():
        for rec in recs:
            where = _where(pid, rec)
            for lock in rec.get("locks", []):
                if lock["kind"] not in ("flock", "posix", "ofd"):
                    raise CheckpointError(
                        f"{where}: holds a {lock['kind'].lower()} on the file, which "
                        "cannot be dumped"
                    )
            if rec["type"] in ("anon", "other") and not anon.restorable(rec):
                raise CheckpointError(f"{where}: this kind of file cannot be dumped")
            if "pidfd" in rec:
                _check_pidfd(where, rec, pids)
            if rec["type"] != "socket":
                continue
            family = rec["sock_family"]
            if family == "unix":
                _check_unix(where, rec, inodes, listeners)
            elif family in FAMILY_NUMBERS:
                _check_inet(where, rec, tcp_established)
            elif family == "netlink":
                _check_netlink(where, rec)
            else:
                raise CheckpointError(f"{where}: {_a(family)} socket cannot be dumped")


def _check_epolls(records: dict[int, list[dict]]) -> None:
    if found := epoll_without_restorer(records):
        pid, rec, tfd = found
        raise CheckpointError(
            f"{_where(pid, rec)} (epoll) watches fd {tfd}, which was closed or reused "
            "since, and no process sharing the epoll holds it: not supported"
        )


def epoll_without_restorer(records: dict[int, list[dict]]) -> tuple[int, dict, int] | None:
    """An epoll whose watch list no holder can restore, as (pid, fd record, a watched
    fd closed there), or None. The list is restored by one process holding the epoll
    whose fd numbers are open on every watched file (anon._epoll_watches); records of
    one epoll share an "ofd" id (a forked child holds its parent's)."""
    holders: dict[object, list[tuple[int, dict]]] = {}
    for pid, recs in records.items():
        for rec in recs:
            if "epoll" in rec:
                key = rec.get("ofd", (pid, rec["fd"]))
                holders.setdefault(key, []).append((pid, rec))
    for group in holders.values():
        if all(any(w.get("closed_here") for w in rec["epoll"]) for _, rec in group):
            pid, rec = group[0]
            return pid, rec, next(w["tfd"] for w in rec["epoll"] if w.get("closed_here"))
    return None


def _check_pidfd(where: str, rec: dict, pids: set[int]) -> None:
    """A pidfd of a process of the tree comes back with it (same PID), and one whose
    process was reaped (-1) as such. Another process's would name whichever process
    has that PID on the restoring machine, if any."""
    target = rec["pidfd"]["pid"]
    if target != -1 and target not in pids:
        raise CheckpointError(
            f"{where}: a pidfd of process {target}, outside the dumped tree "
            "(or a thread of it): dump that process with it"
        )


def peer_closed(rec: dict) -> bool:
    """A unix stream or seqpacket socket whose peer is gone (closed): no peer inode,
    shut for reading and writing."""
    return (
        rec["sock_type"] != "dgram"
        and rec.get("sock_connected", False)
        and not rec.get("sock_peer")
        and rec.get("sock_shutdown", 0) == sockets.SHUTDOWN_MASK
    )


def _check_unix(where: str, rec: dict, inodes: set[int], listeners: set[bytes]) -> None:
    if rec["sock_type"] not in ("stream", "dgram", "seqpacket"):
        raise CheckpointError(f"{where}: a unix {rec['sock_type']} socket cannot be dumped")
    if rec.get("sock_scm_fds"):
        raise CheckpointError(
            f"{where}: {rec['sock_scm_fds']} file descriptors sent over it (SCM_RIGHTS) are "
            "waiting to be received: they cannot be dumped"
        )
    peer = rec.get("sock_peer", 0)
    # Connected to a listener of the tree that has not accepted it yet: the
    # restore connects again. A peer that closed leaves the socket shut both ways:
    # the restore closes the other end of a new pair.
    waiting = not peer and rec.get("sock_peer_name") in listeners
    if (
        rec["sock_type"] != "dgram"
        and rec.get("sock_connected")
        and peer not in inodes
        and not waiting
        and not peer_closed(rec)
    ):
        name = rec.get("sock_peer_name") or b"an unnamed socket"
        raise CheckpointError(
            f"{where}: unix {rec['sock_type']} connected to {name.decode(errors='replace')} "
            "outside the dumped tree: dump that process with it"
        )
    # Queued messages are sent again at restore: from the peer of a pair in the
    # tree, or from an unnamed socket to a named one when no sender had a name.
    pair = (peer in inodes or peer_closed(rec)) and rec["sock_type"] != "stream"
    queued = len(rec.get("sock_messages") or [])
    named = sum(1 for sender in rec.get("sock_senders") or [] if sender)
    if queued and not pair and (named or not rec.get("sock_name")):
        who = f"{named} of {queued}" if named else f"{queued}"
        raise CheckpointError(
            f"{where}: {who} unix {rec['sock_type']} messages queued are from senders "
            "that a restore cannot stand in for"
        )


# TCP states dumped through repair mode: established, and established with a FIN
# or two behind it. Repair mode rebuilds only an established connection, so restore
# makes it as it was before them and sends them again: the peer's (received: the
# peer closed, as an idle pooled connection whose server timed out) from the peer's
# address on a raw socket, the program's own (it called shutdown(SHUT_WR), or
# closed after the peer did) by shutdown(SHUT_WR) once out of repair mode. The peer
# takes a FIN it had as a retransmission, and acks it again.
PEER_FIN = ("close-wait", "closing", "last-ack")
OWN_FIN = ("fin-wait1", "fin-wait2", "closing", "last-ack")
REPAIRED = ("established", *PEER_FIN, "fin-wait1", "fin-wait2")


def _check_netlink(where: str, rec: dict) -> None:
    # The kernel's messages cannot be queued again from user space (their sender
    # would be us, not port 0), and a reply half read (a dump answered in parts)
    # would never end: refused, as CRIU does. The tree runs on; dump again.
    if rec["nl_unread"]:
        raise CheckpointError(
            f"{where}: netlink messages are queued on it, unread: they cannot be dumped (try again)"
        )


# Protocols of the inet sockets restore makes: TCP streams; UDP and ping (ICMP)
# datagrams. (The number is absent from images written before it was kept: UDP
# or TCP.)
INET_PROTOCOLS = {
    "stream": {socket.IPPROTO_TCP},
    "dgram": {socket.IPPROTO_UDP, socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6},
}


def _check_inet(where: str, rec: dict, tcp_established: bool) -> None:
    if rec["sock_type"] not in INET_PROTOCOLS:
        raise CheckpointError(
            f"{where}: {_a(rec['sock_family'])} {rec['sock_type']} socket cannot be dumped"
        )
    protocol = rec.get("sock_protocol")
    if protocol is not None and protocol not in INET_PROTOCOLS[rec["sock_type"]]:
        name = {132: "SCTP", 136: "UDP-Lite", 262: "MPTCP"}.get(protocol, f"protocol {protocol}")
        raise CheckpointError(f"{where}: {_a(rec['sock_family'])} {name} socket cannot be dumped")
    if rec["sock_type"] == "dgram":
        return
    state = rec["tcp_state"]
    if state in REPAIRED:
        if not tcp_established:
            what = "established" if state == "established" else f"established ({state})"
            raise CheckpointError(
                f"{where}: {what} TCP connection {_endpoint(rec['sock_local'])} -> "
                f"{_endpoint(rec['sock_peer_addr'])}: "
                "dumped only with --tcp-established (dump, converge, migrate)"
            )
    elif state == "syn-sent" and not rec.get("sock_peer_addr"):
        raise CheckpointError(f"{where}: a TCP connect in progress to an unknown address")
    elif state == "ended" and rec.get("sock_queued"):
        raise CheckpointError(
            f"{where}: a TCP connection that ended ({_endpoint(rec['sock_local'])}) holds "
            f"{rec['sock_queued']} bytes not yet read, which a restore cannot queue again; "
            "dump again once the program has read them"
        )
    elif state not in ("listen", "close", "syn-sent", "ended"):
        raise CheckpointError(f"{where}: TCP connection in state {state} cannot be dumped")


class RepairedConnections:
    """The tree's established TCP connections, in repair mode and locked by a
    netfilter rule: killed now, they go away without a word to their peers."""

    def __init__(self) -> None:
        self.held: list[tuple[int, int, dict]] = []  # (pid, fd, record)

    def release(self) -> None:
        """The tree runs on (or the dump failed): out of repair mode, unlocked."""
        for pid, fd, rec in self.held:
            try:
                with sockets.socket_of(sockets.copy_fd(pid, fd)) as sock:
                    sockets.leave_repair(sock, reuseaddr_of(rec))
            except OSError:
                pass  # the process is gone: so is its connection
        netlock.unlock_connections([connection(rec) for _, _, rec in self.held])
        self.held.clear()


def reuseaddr_of(rec: dict) -> int:
    """SO_REUSEADDR as the dump read it, before repair mode changed it."""
    return int(rec.get("sock_options", {}).get("reuseaddr", 0))


def connection(rec: dict) -> netlock.Connection:
    """What locks an established connection's fd record."""
    return FAMILY_NUMBERS[rec["sock_family"]], rec["sock_local"], rec["sock_peer_addr"]


def lift_locks(records: dict[int, list[dict]]) -> int:
    """Remove the netfilter rules that lock the connections of a dump's fd records
    (a restore, once its connections are rebuilt; `unlock`, for images that will
    not be restored).
    Returns how many connections there were."""
    conns = {
        rec["sock_inode"]: connection(rec)
        for recs in records.values()
        for rec in recs
        if rec.get("tcp_state") in REPAIRED
    }
    netlock.unlock_connections(list(conns.values()))
    return len(conns)


def repair_established(records: dict[int, list[dict]], held: RepairedConnections) -> None:
    """Lock every established connection (one netfilter batch), turn repair mode
    on, and add its state (tcp_repair) to every fd record of it."""
    first: dict[int, tuple[int, dict]] = {}  # inode -> (pid, record)
    for pid, recs in records.items():
        for rec in recs:
            if rec.get("tcp_state") in REPAIRED:
                first.setdefault(rec["sock_inode"], (pid, rec))
    if not first:
        return
    if not proc.read_creds(os.getpid())["cap_eff"] & 1 << CAP_NET_ADMIN:
        pid, rec = next(iter(first.values()))
        raise CheckpointError(
            f"{_where(pid, rec)}: dumping established TCP connections needs CAP_NET_ADMIN "
            "(TCP repair mode, netfilter rules)"
        )
    # The locks first: segments still arriving would change the queues read next.
    held.held.extend((pid, rec["fd"], rec) for pid, rec in first.values())
    try:
        netlock.lock_connections([connection(rec) for _, rec in first.values()])
    except OSError as exc:
        raise CheckpointError(f"locking TCP connections: {exc}") from None
    state = {inode: _repair_one(pid, rec) for inode, (pid, rec) in first.items()}
    for recs in records.values():
        for rec in recs:
            if rec.get("tcp_state") in REPAIRED:
                rec["tcp_repair"] = state[rec["sock_inode"]]


def _repair_one(pid: int, rec: dict) -> dict:
    try:
        with sockets.socket_of(sockets.copy_fd(pid, rec["fd"])) as sock:
            sockets.set_repair(sock, sockets.TCP_REPAIR_ON)
            return sockets.read_tcp_repair_state(sock)
    except OSError as exc:
        raise CheckpointError(
            f"{_where(pid, rec)}: TCP repair: {exc.strerror or exc}"
            + (" (needs CAP_NET_ADMIN)" if getattr(exc, "errno", 0) == 1 else "")
        ) from None


def _a(word: str) -> str:
    """`word` with its indefinite article: "an inet", "a unix"."""
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word}"
