"""SysV shared memory: each segment of the dump made once, with its key (and its
id where the kernel allows it: shm_next_id), or found still there (a segment
outlives its processes), filled from the images, attached by
every process at its dumped address. A segment that was removed (IPC_RMID) while
still attached is removed again once every process has attached it."""

from __future__ import annotations

from checkpointer.kernel import sysvshm
from checkpointer.restore.images import RestoreError, RestoreImages, piece_data
from checkpointer.restore.task import Task


class SysvSegments:
    def __init__(self, images: RestoreImages) -> None:
        self.images = images
        self.ids: dict[str, int] = {}  # page owner -> id of the new segment
        self.removed: set[str] = set()
        self.kept: set[str] = set()  # segments found still there, not made here

    def attach(self, task: Task, vma: dict) -> None:
        owner, seg = vma["shmem"], vma["sysv"]
        if owner not in self.ids:
            self.ids[owner] = self._create(owner, seg)
        try:
            sysvshm.attach_in(task.session, self.ids[owner], vma["start"],
                              "w" in vma["prot"], "x" in vma["prot"])  # fmt: skip
        except OSError as exc:
            raise RestoreError(
                f"process {task.pid}: SysV shared memory {seg['id']} at {vma['start']:#x}: {exc}"
            ) from None

    def _create(self, owner: str, seg: dict) -> int:
        found = sysvshm.find_key(seg["key"]) if seg["key"] else None
        if found is not None:  # the dumped segment itself, unused (checked by preflight)
            shmid = found["id"]
            self.kept.add(owner)
        else:
            try:
                shmid = sysvshm.create(seg["key"], seg["size"], seg["mode"], seg["id"])
            except OSError as exc:
                raise RestoreError(
                    f"SysV shared memory key {seg['key']:#x}: {exc.strerror}"
                ) from None
        if seg["mode"] & sysvshm.SHM_DEST:
            self.removed.add(owner)
        for piece in self.images.pieces.get(owner, []):
            if piece.source is not None:
                for off, data in piece_data(piece):
                    sysvshm.fill(shmid, off, data)
        return shmid

    def keep(self) -> None:
        """The restore worked: the segments stay, but those removed at dump time."""
        for owner in self.removed:
            sysvshm.remove(self.ids.pop(owner))
        self.ids.clear()

    def close(self) -> None:
        """Remove what a failed restore made."""
        for owner, shmid in self.ids.items():
            if owner not in self.kept:
                sysvshm.remove(shmid)
        self.ids.clear()
