"""`restore --wait`: a restorer started before its dump exists.

A restore started after the dump pays, in the service's downtime, for the
interpreter's start, the modules' imports and the writing of every page. Started
ahead, the restorer has done the first two already, and while the tree still
runs it rebuilds each pre-dump that appears beside the awaited dump (a converge
chain: DIR/1, DIR/2... beside DIR/final) in a template, as a migration's
destination does (template.py). Once the dump is complete and the PIDs its tree
needs are free (the dumper killed the tree and its parent reaped it), the restore
runs at once and writes only the pages written since the newest pre-dump.

Dumps are renamed into place complete, so looking for an inventory is enough to
see one appear; the directory is looked at every POLL_S.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from checkpointer.errors import CheckpointError, ImageError
from checkpointer.images import Dump
from checkpointer.kernel import proc
from checkpointer.restore import template as templates
from checkpointer.restore.restorer import MALFORMED, RestoreRequest, RestoreResult, restore

log = logging.getLogger("checkpointer")

POLL_S = 0.01


def wait_and_restore(req: RestoreRequest, timeout: float) -> RestoreResult:
    """Restore req.images_dir once it is a complete dump whose PIDs are free, within
    `timeout` seconds; meanwhile keep a template of the newest pre-dump beside it."""
    deadline = time.monotonic() + timeout
    watcher = _PreDumps(Path(req.images_dir))
    template = None
    log.info("waiting for a dump at %s", req.images_dir)
    try:
        while not (Path(req.images_dir) / "inventory").is_file():
            newest = watcher.newest_new()
            if newest is not None:
                template = _prepare(newest, template)
            _sleep_until(deadline, f"no dump appeared at {req.images_dir}")
        _wait_for_pids(Path(req.images_dir), deadline)
        template, given = None, template  # the restore consumes it
        try:
            return restore(dataclasses.replace(req, template=given))
        finally:
            if given is not None:
                given.kill()  # reaped (restore only sent it SIGKILL)
    finally:
        if template is not None:
            template.kill()


def _prepare(path: Path, previous):
    """A template of the pre-dump at `path` (from `previous`), or `previous` as it
    was if it cannot be made: the restore then writes more pages, nothing worse."""
    started = time.monotonic()
    try:
        made = templates.build(str(path), previous)
    except (CheckpointError, OSError, *MALFORMED) as err:
        log.debug("no template of %s", path, exc_info=True)
        log.warning("no template of %s (the restore will write more pages): %s", path, err)
        return previous
    log.info("template of %s in %.0f ms", path, (time.monotonic() - started) * 1e3)
    return made


def _wait_for_pids(path: Path, deadline: float) -> None:
    """Until no process holds a PID of the dumped tree: a dumper that kills the tree
    commits first, and the killed processes stay until their parent reaps them."""
    dump = Dump.open(str(path))
    pids = [p["pid"] for p in dump.pstree] + [t for p in dump.pstree for t in p["threads"]]
    while taken := [pid for pid in pids if proc.exists(pid)]:
        _sleep_until(deadline, f"PID {taken[0]} of the dump is still taken")


def _sleep_until(deadline: float, why: str) -> None:
    if time.monotonic() >= deadline:
        raise CheckpointError(f"gave up waiting: {why}")
    time.sleep(POLL_S)


class _PreDumps:
    """Complete pre-dumps that appear beside the awaited dump, newest first."""

    def __init__(self, awaited: Path) -> None:
        self.where = awaited.parent
        self.awaited = awaited.name
        self.seen: set[str] = set()

    def newest_new(self) -> Path | None:
        """The newest pre-dump committed since the last call, if any."""
        found = []
        try:
            entries = list(os.scandir(self.where))
        except OSError:
            return None
        for entry in entries:
            name = entry.name
            if name in self.seen or name.startswith(".") or name == self.awaited:
                continue
            if not os.path.isfile(os.path.join(entry.path, "inventory")):
                continue  # not a dump, or not yet
            self.seen.add(name)
            try:
                dump = Dump.open(entry.path)
            except ImageError:
                continue
            if dump.inventory["kind"] == "pre-dump":
                found.append((dump.inventory["created"], Path(entry.path)))
        return max(found)[1] if found else None
