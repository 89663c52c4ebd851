"""checkpointer: incremental process checkpoints for Linux, in the style of CRIU."""

__version__ = "0.1.0"
