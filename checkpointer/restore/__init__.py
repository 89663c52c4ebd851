"""Restore a final dump: images -> restorer -> kernel (see restorer.py for the steps)."""

from checkpointer.restore.images import RestoreError
from checkpointer.restore.restorer import RestoreRequest, RestoreResult, restore, wait_root

__all__ = ["RestoreError", "RestoreRequest", "RestoreResult", "restore", "wait_root"]
