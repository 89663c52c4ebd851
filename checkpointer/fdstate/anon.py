"""Event fds (anon_inode:[eventfd], [timerfd], [signalfd], [eventpoll]): what the
kernel shows of each in fdinfo, under a field named after its kind."""

from __future__ import annotations

from checkpointer import fdstate
from checkpointer.errors import UnsupportedObject
from checkpointer.kernel import eventfds, proc

# readlink target -> (record field, reader)
EVENT_KINDS = {
    "anon_inode:[eventfd]": ("eventfd", eventfds.read_eventfd),
    "anon_inode:[timerfd]": ("timerfd", eventfds.read_timerfd),
    "anon_inode:[signalfd]": ("signalfd", eventfds.read_signalfd),
    "anon_inode:[eventpoll]": ("epoll", None),
}


def describe(pid: int, record: dict) -> dict:
    kind = EVENT_KINDS.get(record["target"])
    if kind is None:
        return {}
    field, reader = kind
    if reader is not None:
        return {field: reader(pid, record["fd"])}
    return {"epoll": _epoll_watches(pid, record["fd"])}


def _epoll_watches(pid: int, fd: int) -> list[dict]:
    """The watch list; each watched fd must still be open on the watched file (an
    epoll watch outlives the fd number it was added by when the file stays open
    through another fd: that cannot be added again)."""
    watches = eventfds.read_epoll_watches(pid, fd)
    for w in watches:
        st = proc.stat_fd(pid, w["tfd"])
        if st is None or st.st_ino != w["ino"]:
            raise UnsupportedObject(
                f"fd {fd} of process {pid} (epoll) watches fd {w['tfd']}, which was "
                "closed or reused since: not supported"
            )
        del w["ino"]
    return watches


fdstate.DESCRIBERS["anon"] = describe
