"""The only layer that talks to the kernel: ptrace, /proc readers, pagemap, uffd, memory.

Import the submodules directly (`from checkpointer.kernel import ptrace, proc`).
"""

from checkpointer.kernel import features, memory, pagemap, proc, ptrace, syscalls, uffd

__all__ = ["features", "memory", "pagemap", "proc", "ptrace", "syscalls", "uffd"]
