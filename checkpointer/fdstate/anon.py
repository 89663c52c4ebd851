"""Event fds (anon_inode:[eventfd], [timerfd], [signalfd], [eventpoll], inotify)
and pidfds: what the kernel shows of each in fdinfo, under a field named after
its kind. An anon_inode fd of another kind gets no field: fdstate.tree refuses it
at dump."""

from __future__ import annotations

import logging
import os

from checkpointer import fdstate
from checkpointer.errors import UnsupportedObject
from checkpointer.kernel import eventfds, inotify, proc
from checkpointer.kernel.uffd import get_fd

log = logging.getLogger("checkpointer")

# readlink target -> (record field, reader)
EVENT_KINDS = {
    "anon_inode:[eventfd]": ("eventfd", eventfds.read_eventfd),
    "anon_inode:[timerfd]": ("timerfd", eventfds.read_timerfd),
    "anon_inode:[signalfd]": ("signalfd", eventfds.read_signalfd),
    "anon_inode:[eventpoll]": ("epoll", None),
    "anon_inode:inotify": ("inotify", None),
    "anon_inode:[pidfd]": ("pidfd", eventfds.read_pidfd),
}
FIELDS = tuple(field for field, _ in EVENT_KINDS.values())


def restorable(record: dict) -> bool:
    return any(field in record for field in FIELDS)


def describe(pid: int, record: dict) -> dict:
    kind = EVENT_KINDS.get(record["target"])
    if kind is None:
        return {}
    field, reader = kind
    if reader is not None:
        return {field: reader(pid, record["fd"])}
    if field == "inotify":
        return {"inotify": _inotify_watches(pid, record["fd"])}
    return {"epoll": _epoll_watches(pid, record["fd"])}


def _inotify_watches(pid: int, fd: int) -> list[dict]:
    """[{wd, path, mask}]: each watched inode by the path it has now. Events queued
    and not read yet cannot be queued again, like those of the downtime: said."""
    where = f"fd {fd} of process {pid} (inotify)"
    watches = []
    for w in inotify.read_watches(pid, fd):
        path = inotify.path_of_handle(w["dev"], w["handle_type"], w["handle"], w["ino"])
        if path is None:
            raise UnsupportedObject(
                f"{where} watches inode {w['ino']} on device {w['dev'][0]}:{w['dev'][1]}, "
                "which has no path here (deleted, or on a mount we do not see)"
            )
        watches.append({"wd": w["wd"], "path": path, "mask": w["mask"]})
    ours = get_fd(pid, fd)
    try:
        queued = inotify.queued_bytes(ours)
    finally:
        os.close(ours)
    if queued:
        log.warning("%s: %d bytes of events queued are not carried over", where, queued)
    return watches


def _epoll_watches(pid: int, fd: int) -> list[dict]:
    """The watch list. An epoll watch outlives the fd number it was added by when
    the file stays open through another fd, and a watch can only be added again
    by an fd open on the watched file. A watched fd that this process closed (or
    reused) is marked `closed_here`: a process sharing the epoll (a forked child
    shares its parent's) may hold it, and then restores the watch list
    (fdstate.tree refuses an epoll that no holder can restore)."""
    watches = eventfds.read_epoll_watches(pid, fd)
    for w in watches:
        st = proc.stat_fd(pid, w["tfd"])
        if st is None or st.st_ino != w["ino"]:
            w["closed_here"] = True
        del w["ino"]
    return watches


fdstate.DESCRIBERS["anon"] = describe
