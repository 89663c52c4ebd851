"""Reaps the copy-on-write children of a dump whose tool died.

A snapshot's children die with the tool (PTRACE_O_EXITKILL), but with exit
signal 0 each stays a zombie of its target until someone waits for exactly that
pid with __WALL, and only the target can. A dump that is SIGKILLed cannot do it,
so before the first clone it starts this small process:

    python -m checkpointer.reaper    stdin: "PARENT CHILD NSPID" per clone, "reaped CHILD", "done"
                                     stdout: "ready" once, when it is running

"reaped CHILD" (the dump reaped that one itself) and "done" are the dump's own
clean-up; "done" ends the watchdog quietly. End of input
without "done" means the dump died: it kills each child it was told of (through
a pidfd, so a reused pid is never hit), waits until it is dead, then stops the
parent for an injected waitid, as the dump would have.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

# How long the dead tool's ptrace links may take to go, and a child to die.
GRACE_S = 10.0


def main() -> int:
    # Ctrl-C in the dump's terminal must not take the watchdog with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The interpreter has started: the dump may freeze now without sharing the CPU
    # with this start-up (it would otherwise run inside the frozen window).
    with contextlib.suppress(OSError):
        sys.stdout.write("ready\n")
        sys.stdout.close()
    children: dict[int, tuple[int, int, int]] = {}  # child -> (parent, ns_pid, pidfd)
    for line in sys.stdin:
        words = line.split()
        if words == ["done"]:
            return 0
        if words[0] == "reaped":
            *_, pidfd = children.pop(int(words[1]), (0, 0, -1))
            if pidfd >= 0:
                os.close(pidfd)
            continue
        parent, child, ns_pid = (int(word) for word in words)
        try:
            children[child] = (parent, ns_pid, os.pidfd_open(child))
        except ProcessLookupError:
            continue  # gone and reaped already
    for child, (parent, ns_pid, pidfd) in children.items():
        _reap_orphan(parent, child, ns_pid, pidfd)
    return 0


def _reap_orphan(parent: int, child: int, ns_pid: int, pidfd: int) -> None:
    # Imported only now: the watchdog starts with every snapshot dump and mostly
    # just reads "done"; a bare interpreter starts in a fraction of the time.
    from checkpointer.errors import TargetError
    from checkpointer.freezer import stopped_thread
    from checkpointer.kernel import cowchild
    from checkpointer.kernel.inject import SyscallSession

    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    select.select([pidfd], [], [], GRACE_S)  # readable once it is dead
    os.close(pidfd)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        try:
            # The target may still be traced by the dying tool for a moment.
            with stopped_thread(parent) as tid, SyscallSession(tid) as session:
                cowchild.reap(session, ns_pid, child)
            return
        except TargetError:
            if not os.path.exists(f"/proc/{parent}"):
                return  # its parent is gone too: init reaps orphans
            time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
