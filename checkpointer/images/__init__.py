"""The image library: dump directories of msgpack records and zstd page frames.

Knows nothing of ptrace or /proc. See docs/architecture.md and images/README.md.
"""

from checkpointer.images.format import FORMAT_VERSION
from checkpointer.images.pagewriter import FROZEN_INCREMENTAL_LEVEL, FROZEN_LEVEL, PAGE_LEVEL
from checkpointer.images.reader import Core, Dump, Mm, PageMap, PageRun, is_complete_dump
from checkpointer.images.writer import DumpWriter, PageStats, PageWriter

__all__ = [
    "FORMAT_VERSION",
    "FROZEN_INCREMENTAL_LEVEL",
    "FROZEN_LEVEL",
    "PAGE_LEVEL",
    "Core",
    "Dump",
    "DumpWriter",
    "Mm",
    "PageMap",
    "PageRun",
    "PageStats",
    "PageWriter",
    "is_complete_dump",
]
