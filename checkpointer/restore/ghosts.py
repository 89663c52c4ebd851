"""Deleted files ("ghosts") come back as they were: each is created once, in the
directory it was deleted from, filled from the images, opened or mapped by every
process that had it, then unlinked again, so the restored fds and mappings show
"(deleted)" as before. A deleted working directory, and the directory of a
deleted file if it went too, are made again the same way for the restore (empty,
0700), entered or used, and removed with the ghosts."""

from __future__ import annotations

import os

from checkpointer.restore.images import RestoreError, RestoreImages, piece_data


class GhostFiles:
    def __init__(self, images: RestoreImages) -> None:
        self.images = images
        self.paths: dict[str, str] = {}  # page owner -> path created
        self.dirs: dict[str, str] = {}  # deleted directory -> path made for it
        self.made: list[str] = []  # every directory made, parents first

    def path(self, ghost: dict, original: str) -> str:
        """Where the ghost `ghost` (an fd or vma record's field) lives until
        unlink_all; created at its first use."""
        owner = ghost["owner"]
        if owner not in self.paths:
            self.paths[owner] = self._create(ghost, original)
        return self.paths[owner]

    def directory(self, original: str) -> str:
        """A directory standing in for the deleted directory `original` (a
        working directory) until unlink_all; made at its first use."""
        if original in self.made:  # made already as a deleted file's directory
            self.dirs[original] = original
        if original not in self.dirs:
            self._make_parents(original)
            path, _ = _make_free(original, "deleted directory", lambda p: os.mkdir(p, 0o700))
            self.made.append(path)
            self.dirs[original] = path
        return self.dirs[original]

    def _make_parents(self, original: str) -> None:
        """The missing directories above `original`, made and remembered."""
        missing = []
        parent = os.path.dirname(original)
        while parent and not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                raise RestoreError(f"directory {path} for {original}: {exc.strerror}") from None
            self.made.append(path)

    def _create(self, ghost: dict, original: str) -> str:
        self._make_parents(original)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        path, fd = _make_free(original, "deleted file", lambda p: os.open(p, flags, 0o600))
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
        for path in reversed(self.made):  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                pass  # something else put a file in it meanwhile: left
        self.made.clear()
        self.dirs.clear()


def _make_free(original: str, what: str, make):
    """make(path) at the original name if free, else at a name beside it
    (something else took it); (path, what make returned)."""
    for n in range(100):
        path = original if n == 0 else f"{original}.checkpointer-ghost-{n}"
        try:
            return path, make(path)
        except FileExistsError:
            continue
        except OSError as exc:
            raise RestoreError(f"{what} {original}: {exc.strerror}") from None
    raise RestoreError(f"{what} {original}: no free name beside it")
