"""What each VMA is, and how its pages get dumped.

The rules follow CRIU's: private memory is dumped page by page (present or
swapped pages only, never the zero page, never private file pages that were
never written); [vdso] whole; [vvar] and [vsyscall] never; writable shared
memory whole, once per object however many processes map it; read-only shared
file mappings not at all (their contents live in the file).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass


class Policy(enum.Enum):
    PRIVATE = "private"  # present, non-zero, non-file pages, tracked for dirtiness
    WHOLE = "whole"  # every page of the range, from this process ([vdso])
    SHARED = "shared"  # every page, once per shared object
    SKIP = "skip"


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    prot: str  # "rwxp" / "r--s" as in /proc/PID/maps
    offset: int
    dev: str
    inode: int
    path: str
    vmflags: tuple[str, ...] = ()
    deleted: bool = False  # the mapped file was unlinked (maps: " (deleted)")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.prot[3] == "s"

    @property
    def writable(self) -> bool:
        return self.prot[1] == "w"

    # Computed once per VMA (each is asked a dozen times per pass, and a process
    # may have tens of thousands); cached_property writes past the frozen __setattr__.
    @functools.cached_property
    def kind(self) -> str:
        return classify(self)

    @functools.cached_property
    def policy(self) -> Policy:
        return dump_policy(self)

    @property
    def anonymous(self) -> bool:
        """Private anonymous memory (no file behind it): every page it holds is
        anonymous, so a page scan need not ask whether a page is a file's."""
        return not self.shared and self.kind in ("anon", "heap", "stack")

    @property
    def shmem_owner(self) -> str | None:
        """Image owner id of the shared object behind a SHARED vma."""
        if self.policy is not Policy.SHARED:
            return None
        return f"shm-{self.dev.replace(':', '')}-{self.inode}"


SPECIAL = {"[vdso]": "vdso", "[vvar]": "vvar", "[vvar_vclock]": "vvar", "[vsyscall]": "vsyscall"}


def classify(vma: Vma) -> str:
    """anon, heap, stack, file, file-private, shared-anon, shm, memfd, vdso, vvar, ..."""
    path = vma.path
    if path in SPECIAL:
        return SPECIAL[path]
    if path == "[heap]":
        return "heap"
    if path.startswith("[stack"):
        return "stack"
    if vma.shared:
        if path.startswith("/SYSV"):
            return "shm"
        if path.startswith("/memfd:"):
            return "memfd"
        if vma.inode == 0 or path.startswith("/dev/zero") or path.startswith("[anon_shmem"):
            return "shared-anon"
        return "file"
    if vma.inode == 0:
        # Named anonymous memory reads "[anon:NAME]"; other bracketed names are
        # kernel-provided areas (e.g. [uprobes]) that are not the process's data.
        return "special" if path.startswith("[") and not path.startswith("[anon") else "anon"
    return "file-private"


def dump_policy(vma: Vma) -> Policy:
    kind = vma.kind
    if kind in ("vvar", "vsyscall", "special"):
        return Policy.SKIP
    if kind == "vdso":
        return Policy.WHOLE
    if unsupported(vma):
        return Policy.SKIP  # the dumper refuses the whole dump first (dump.py)
    if vma.shared:
        # Shared memory objects that live only while mapped or open are dumped
        # whole. A shared file mapping, writable or not, is the file's page cache:
        # the file holds it, and restore maps the file again (as CRIU does; a
        # deleted file's contents are stored whole: a ghost).
        if kind in ("shared-anon", "shm", "memfd"):
            return Policy.SHARED
        return Policy.SKIP
    return Policy.PRIVATE


def unsupported(vma: Vma) -> str | None:
    """Why this mapping cannot be dumped, or None. The dump is refused rather than
    written without it: a restore would silently lack that memory."""
    if vma.kind in ("vdso", "vvar", "vsyscall", "special"):
        return None  # the kernel's own areas ([vvar] is VM_IO|VM_PFNMAP): never data
    if "ht" in vma.vmflags:
        return "hugetlb mappings are not supported (their pages are not read page by page)"
    if "io" in vma.vmflags or "pf" in vma.vmflags:
        return "device memory (VM_IO/VM_PFNMAP) is not supported: reading it may have effects"
    if vma.path.startswith("anon_inode:"):
        what = vma.path.removeprefix("anon_inode:").strip("[]")
        return f"memory the kernel shares with the program ({what}) is not supported"
    if vma.path == "/[aio]" and vma.deleted:
        return "the ring of an AIO context (io_setup) is not supported"
    if vma.path == "/secretmem" and vma.deleted:
        return "secret memory (memfd_secret) is not supported: no other process can read it"
    return None


def vma_record(vma: Vma) -> dict:
    """The mm image's record of one VMA."""
    return {
        "start": vma.start,
        "end": vma.end,
        "prot": vma.prot,
        "offset": vma.offset,
        "dev": vma.dev,
        "inode": vma.inode,
        "path": vma.path,
        "kind": vma.kind,
        "vmflags": list(vma.vmflags),
        "shmem": vma.shmem_owner,
        "deleted": vma.deleted,
    }
