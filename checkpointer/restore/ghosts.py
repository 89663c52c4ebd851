"""Deleted files ("ghosts") come back as they were: each is created once, in the
directory it was deleted from, filled from the images, opened or mapped by every
process that had it, then unlinked again, so the restored fds and mappings show
"(deleted)" as before."""

from __future__ import annotations

import os

from checkpointer.restore.images import RestoreError, RestoreImages, piece_data


class GhostFiles:
    def __init__(self, images: RestoreImages) -> None:
        self.images = images
        self.paths: dict[str, str] = {}  # page owner -> path created

    def path(self, ghost: dict, original: str) -> str:
        """Where the ghost `ghost` (an fd or vma record's field) lives until
        unlink_all; created at its first use."""
        owner = ghost["owner"]
        if owner not in self.paths:
            self.paths[owner] = self._create(ghost, original)
        return self.paths[owner]

    def _create(self, ghost: dict, original: str) -> str:
        for n in range(100):
            # The original name if free, else a name beside it (something else took it).
            path = original if n == 0 else f"{original}.checkpointer-ghost-{n}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise RestoreError(f"deleted file {original}: {exc.strerror}") from None
        else:
            raise RestoreError(f"deleted file {original}: no free name beside it")
        try:
            for piece in self.images.pieces.get(ghost["owner"], []):
                if piece.source is not None:
                    for off, data in piece_data(piece):
                        os.pwrite(fd, data, off)
            os.ftruncate(fd, ghost["size"])
            os.fchmod(fd, ghost["mode"])
        finally:
            os.close(fd)
        return path

    def unlink_all(self) -> None:
        """Once every process has opened and mapped what it needs."""
        for path in self.paths.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()
