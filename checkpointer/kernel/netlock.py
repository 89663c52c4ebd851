"""Netfilter rules that keep a dumped TCP connection's peer from seeing a reset.

Between the dump (the socket is closed in repair mode: nothing is sent) and the
restore, a segment from the peer would find no socket and draw a RST. One rule
per connection drops the peer's segments to the dumped endpoint instead; the
peer retransmits until the restored socket answers. Rules go into a chain of
our own, CHECKPOINTER, jumped to from INPUT, so they are easy to find and drop.
"""

from __future__ import annotations

import shutil
import subprocess

CHAIN = "CHECKPOINTER"


def _iptables(family: int) -> str:
    name = "ip6tables" if family == 10 else "iptables"
    path = shutil.which(name)
    if path is None:
        raise OSError(f"{name} is not installed: it locks dumped TCP connections")
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _rule(local: tuple, peer: tuple) -> list[str]:
    return ["-p", "tcp", "-s", peer[0], "--sport", str(peer[1]),
            "-d", local[0], "--dport", str(local[1]), "-j", "DROP"]  # fmt: skip


def _ensure_chain(ipt: str) -> None:
    if _run([ipt, "-w", "-n", "-L", CHAIN]).returncode != 0:
        _check(_run([ipt, "-w", "-N", CHAIN]))
    if _run([ipt, "-w", "-C", "INPUT", "-j", CHAIN]).returncode != 0:
        _check(_run([ipt, "-w", "-I", "INPUT", "-j", CHAIN]))


def lock_connection(family: int, local: tuple, peer: tuple) -> None:
    """Drop segments from `peer` to `local` until unlock_connection."""
    ipt = _iptables(family)
    _ensure_chain(ipt)
    if _run([ipt, "-w", "-C", CHAIN, *_rule(local, peer)]).returncode != 0:
        _check(_run([ipt, "-w", "-A", CHAIN, *_rule(local, peer)]))


def unlock_connection(family: int, local: tuple, peer: tuple) -> None:
    """Remove the rule lock_connection added (none left: nothing to do)."""
    ipt = _iptables(family)
    while _run([ipt, "-w", "-D", CHAIN, *_rule(local, peer)]).returncode == 0:
        pass


def _check(r: subprocess.CompletedProcess) -> None:
    if r.returncode != 0:
        raise OSError(f"{' '.join(r.args[:3])}: {r.stderr.strip()}")
