"""Netfilter rules that keep a dumped TCP connection's peer from seeing a reset.

Between the dump (the socket is closed in repair mode: nothing is sent) and the
restore, a segment from the peer would find no socket and draw a RST. One rule
per connection drops the peer's segments to the dumped endpoint instead; the
peer retransmits until the restored socket answers. Rules go into a chain of
our own, CHECKPOINTER, jumped to from INPUT, so they are easy to find and drop.
All rules of a dump go in with one iptables-restore (each iptables run costs
tens of milliseconds, and the tree is frozen meanwhile).
"""

from __future__ import annotations

import shutil
import subprocess

CHAIN = "CHECKPOINTER"
Endpoint = tuple  # (host, port)


def _tool(family: int, name: str) -> str:
    name = name.replace("iptables", "ip6tables") if family == 10 else name
    path = shutil.which(name)
    if path is None:
        raise OSError(f"{name} is not installed: it locks dumped TCP connections")
    return path


def _run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)


def _rule(local: Endpoint, peer: Endpoint) -> str:
    return (f"-p tcp -s {peer[0]} --sport {peer[1]} -d {local[0]} --dport {local[1]} "
            "-j DROP")  # fmt: skip


def _ensure_chain(ipt: str, listed: list[str]) -> None:
    if not listed:  # `-S CHAIN` prints at least "-N CHAIN" when the chain exists
        _check(_run([ipt, "-w", "-N", CHAIN]))
    if _run([ipt, "-w", "-C", "INPUT", "-j", CHAIN]).returncode != 0:
        _check(_run([ipt, "-w", "-I", "INPUT", "-j", CHAIN]))


def _batch(family: int, action: str, connections: list[tuple[Endpoint, Endpoint]]) -> None:
    lines = "".join(f"{action} {CHAIN} {_rule(local, peer)}\n" for local, peer in connections)
    _check(_run([_tool(family, "iptables-restore"), "-w", "--noflush"],
                f"*filter\n{lines}COMMIT\n"))  # fmt: skip


def locked(family: int) -> list[str]:
    """The rules in our chain, as `iptables -S` prints them (a rule added twice is
    listed twice)."""
    r = _run([_tool(family, "iptables"), "-w", "-S", CHAIN])
    return r.stdout.splitlines() if r.returncode == 0 else []


Connection = tuple[int, Endpoint, Endpoint]  # (address family, local, peer)


def _by_family(connections: list[Connection]) -> dict[int, list[tuple[Endpoint, Endpoint]]]:
    """Connections grouped by the family of their packets: an IPv4-mapped IPv6
    address (a dual-stack socket's IPv4 peer) is IPv4 on the wire."""
    out: dict[int, list[tuple[Endpoint, Endpoint]]] = {}
    for family, local, peer in connections:
        local, peer = tuple(local), tuple(peer)
        if family == 10 and local[0].startswith("::ffff:") and "." in local[0]:
            family = 2
            local, peer = (local[0][7:], local[1]), (peer[0].removeprefix("::ffff:"), peer[1])
        pairs = out.setdefault(family, [])
        if (local, peer) not in pairs:
            pairs.append((local, peer))
    return out


def lock_connections(connections: list[Connection]) -> None:
    """Drop segments from each peer to its local endpoint until unlock_connections."""
    for family, pairs in _by_family(connections).items():
        present = locked(family)
        _ensure_chain(_tool(family, "iptables"), present)
        missing = [(here, peer) for here, peer in pairs if _listed(here, peer) not in present]
        if missing:
            _batch(family, "-A", missing)


def unlock_connections(connections: list[Connection]) -> None:
    """Remove the rules lock_connections added (rules already gone are skipped)."""
    for family, pairs in _by_family(connections).items():
        present = locked(family)
        mine = [(h, p) for h, p in pairs for _ in range(present.count(_listed(h, p)))]
        if mine:
            _batch(family, "-D", mine)


def _listed(local: Endpoint, peer: Endpoint) -> str:
    """A rule as `iptables -S` lists it."""
    bits = "/128" if ":" in local[0] else "/32"
    return (f"-A {CHAIN} -s {peer[0]}{bits} -d {local[0]}{bits} -p tcp -m tcp "
            f"--sport {peer[1]} --dport {local[1]} -j DROP")  # fmt: skip


def _check(r: subprocess.CompletedProcess) -> None:
    if r.returncode != 0:
        raise OSError(f"{' '.join(r.args[:1])}: {(r.stderr or r.stdout).strip()}")
