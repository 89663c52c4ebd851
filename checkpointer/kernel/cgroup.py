"""cgroup v2 membership: which group of the unified hierarchy a process is in,
and moving a process into one (cgroup.procs)."""

from __future__ import annotations

import errno
import os


def cgroup2_of(pid: int) -> str | None:
    """The process's cgroup in the unified (v2) hierarchy, as /proc/PID/cgroup
    names it ("/system.slice/app.service"); None on a v1-only system."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


def cgroup2_mount() -> str | None:
    """Where the unified hierarchy is mounted here (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid system), None if it is not."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    return None


def move_to_cgroup2(mount: str, path: str, pid: int) -> None:
    """Move process pid (all its threads) into the cgroup `path` of the unified
    hierarchy mounted at `mount`; OSError if the group is gone or refuses it, or
    if `path` (an image's word) leads outside the hierarchy."""
    root = os.path.realpath(mount)
    group = os.path.realpath(os.path.join(root, path.lstrip("/")))
    if os.path.commonpath([root, group]) != root:
        raise OSError(errno.EINVAL, "not a cgroup")
    # No O_CREAT: only an existing cgroup.procs is written to.
    fd = os.open(os.path.join(group, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)
