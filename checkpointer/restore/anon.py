"""Restore event fds: eventfd (its count), timerfd (clock, time left, interval,
unread expirations), signalfd (its mask), inotify (its watches, each under its
old watch descriptor), epoll (its watches, added inside the task once every fd
of every process exists); and pidfds, of the restored process with the same PID
(every process exists by then), or of a process reaped already."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from checkpointer.kernel import eventfds, inotify
from checkpointer.restore.images import ProcessImage, RestoreError
from checkpointer.restore.task import Task

if TYPE_CHECKING:
    from checkpointer.restore.files import OpenFiles

EVENT_FIELDS = ("eventfd", "timerfd", "signalfd", "epoll", "inotify", "pidfd")


def _field(record: dict) -> str | None:
    return next((k for k in EVENT_FIELDS if k in record), None)


def check(process: ProcessImage, record: dict, source_alive: bool = False) -> None:
    if _field(record) is None:
        raise RestoreError(
            f"fd {record['fd']} of process {process.pid} ({record['target']}) "
            "cannot be restored yet"
        )
    if "pidfd" in record and type(record["pidfd"].get("pid")) is not int:
        raise RestoreError(f"fd {record['fd']} of process {process.pid}: malformed pidfd record")
    for w in record.get("inotify", []):
        if not os.path.lexists(w["path"]):
            raise RestoreError(
                f"fd {record['fd']} of process {process.pid} (inotify) watches "
                f"{w['path']}, which is missing"
            )


def open(files: OpenFiles, task: Task, record: dict) -> int:  # noqa: A001
    flags = record["flags"]
    if "eventfd" in record:
        e = record["eventfd"]
        return eventfds.new_eventfd(e["count"], bool(e["semaphore"]), flags)
    if "timerfd" in record:
        t = record["timerfd"]
        value = t["value"]
        if not any(value) and any(t["interval"]):
            # It expired and was not read yet: the kernel restarts a periodic timer
            # only on read, so it shows no time left. The next expiry is one
            # interval after the pending one (held in ticks).
            value = t["interval"]
        return eventfds.new_timerfd(
            t["clockid"], flags, value, t["interval"], t["ticks"], t["settime_flags"]
        )
    if "signalfd" in record:
        return eventfds.new_signalfd(record["signalfd"]["mask"], flags)
    if "pidfd" in record:
        target = record["pidfd"]["pid"]
        try:
            if target == -1:
                return eventfds.new_dead_pidfd(flags)
            return eventfds.new_pidfd(target, flags)
        except OSError as exc:
            raise RestoreError(
                f"fd {record['fd']} of process {task.pid} (pidfd of {target}): "
                f"{exc.strerror or exc}"
            ) from None
    if "inotify" in record:
        try:
            return inotify.new_inotify(flags, record["inotify"])
        except OSError as exc:
            raise RestoreError(
                f"fd {record['fd']} of process {task.pid} (inotify): {exc.strerror or exc}"
            ) from None
    return eventfds.new_epoll(flags)


def finish(files: OpenFiles, task: Task, record: dict) -> None:
    """An epoll's watches, by fd number in the task; once per open file description
    (a forked child shares its parent's epoll and watch list), by a holder whose fd
    numbers are open on every watched file (not one that closed a watched fd since:
    the dump made sure another holder has them all)."""
    if "epoll" not in record or any(w.get("closed_here") for w in record["epoll"]):
        return
    if not files.first_time(f"epoll {files.description(task, record)}"):
        return
    for w in record["epoll"]:
        try:
            eventfds.add_epoll_watch(task.session, record["fd"], w["tfd"], w["events"], w["data"])
        except OSError as exc:
            raise RestoreError(
                f"fd {record['fd']} of process {task.pid} (epoll): watching fd {w['tfd']}: "
                f"{exc.strerror}"
            ) from None
