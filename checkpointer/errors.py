"""The errors checkpointer expects; the CLI prints them as one line and exits 1."""


class CheckpointError(Exception):
    """An expected failure with a one-line explanation.

    `where` names the file, directory or process the problem is about.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ImageError(CheckpointError):
    """An image file or directory is missing, incomplete, corrupt or hostile."""


class UnsupportedVersion(ImageError):
    """An image written by a format version this code cannot read."""


class TargetError(CheckpointError):
    """The target process is gone, cannot be traced, or is traced by someone else."""


class UnsupportedObject(CheckpointError):
    """The tree holds something a dump cannot save (named in the message); the
    dump is refused and the tree left running."""
