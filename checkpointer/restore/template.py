"""A template: a pre-dump's memory, rebuilt at a migration's destination while the
source still runs, so that the final restore writes only what changed since.

Restoring a final dump writes every page of the process; under pre-copy most of
them arrived long before the freeze, yet they were written in the downtime. A
template is a process of the restorer's that never runs a user instruction: after
each pre-dump is committed, the receiver rebuilds in it the root process's private
mappings and their pages (the previous template is cloned and updated, so only the
pre-dump's new pages are written). The final restore then clones the root from the
template instead of the seed (restore/tree.py): the root starts with its pages
copy-on-write, page tables only, keeps the mappings the final dump describes alike,
and writes only the pages that do not come from the same pre-dump page
(restore/inherit.py, restore/memory.py). Shared mappings, deleted files and
mappings a fork does not pass on are left to the final restore.

A template is traced with PTRACE_O_EXITKILL like every restored task: it dies with
the restorer. It holds a PID the restored tree may need on another host; the final
restore then drops it (restorer.py).
"""

from __future__ import annotations

import os
import signal

from checkpointer.kernel import abi
from checkpointer.restore import inherit, memory, tree
from checkpointer.restore.images import ReadChain, template_image
from checkpointer.restore.task import Task, clone_task


class Template:
    """The memory of the dump `name`, held by a stopped, traced process of ours."""

    def __init__(self, name: str, task: Task, chain: ReadChain) -> None:
        self.name = name
        self.task = task
        self.chain = chain  # its dump as read: the final restore reads only what is new
        self.reaped = False  # its PID may be another process's: never signal it again

    @property
    def pid(self) -> int:
        return self.task.pid

    @property
    def session(self):
        return self.task.session

    def send_kill(self) -> None:
        """SIGKILL, not waited for: its exit (unmapping all it holds) runs in the
        kernel while we go on; kill() reaps it."""
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)  # our unreaped child: it is there

    def kill(self) -> None:
        if self.reaped:
            return
        tree.kill_and_reap([self.pid])  # first: nothing to give back to a process that goes
        self.reaped = True
        self.task.close_sessions()


def build(path: str, previous: Template | None = None) -> Template:
    """A template of the dump at `path` (a pre-dump, or a dump), cloned from
    `previous` (then killed) or from a new seed. A failure kills what it made and
    leaves `previous` as it was."""
    image, pieces, chain = template_image(path, previous.chain if previous else None)
    seed = tree.Seed() if previous is None else None
    origin = previous or seed
    created: list[int] = []
    task = None
    try:
        with inherit.cloning(origin.task, image):
            session = clone_task(origin.session, abi.CLONE_PARENT, 0, 0, created)
        task = Task(image, session, cloned_from=origin.task)
        memory.rebuild(task, pieces, None, set_mm=False)
        task.close_restorer_pidfd()
    except BaseException:
        tree.kill_and_reap(created)
        if task is not None:
            task.close_sessions()
        raise
    finally:
        if seed is not None:
            seed.kill()
    if previous is not None:
        previous.kill()
    return Template(os.path.basename(os.path.normpath(path)), task, chain)
