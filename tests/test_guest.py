"""The soft-dirty test guest (scripts/vm-run) really has what the suite relies on.

These tests check the kernel and tools directly, not checkpointer's code: if they fail,
every other softdirty test is meaningless.
"""

import ctypes
import mmap
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.softdirty

PAGE = mmap.PAGESIZE
PM_PRESENT = 1 << 63
PM_SOFT_DIRTY = 1 << 55


def _address(m: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # an exported buffer would keep the mmap from closing


def _pagemap_entry(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        return int.from_bytes(f.read(8), "little")


def _clear_soft_dirty() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")


def test_soft_dirty_bit_follows_writes():
    with mmap.mmap(-1, 2 * PAGE) as m:
        base = _address(m)
        m[0] = 1
        m[PAGE] = 1  # both pages present before the reset
        _clear_soft_dirty()
        m[0] = 2  # write the first page only

        written, untouched = _pagemap_entry(base), _pagemap_entry(base + PAGE)
        assert written & PM_PRESENT and untouched & PM_PRESENT
        assert written & PM_SOFT_DIRTY, "bit 55 not set after a write following clear_refs"
        assert not untouched & PM_SOFT_DIRTY, "bit 55 set on a page not written since clear_refs"

        _clear_soft_dirty()
        assert not _pagemap_entry(base) & PM_SOFT_DIRTY, "clear_refs did not clear bit 55"


def test_criu_has_mem_dirty_track():
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    criu = shutil.which("criu", path=path)
    if criu is None:
        pytest.skip("criu is not installed (apt-get install criu)")
    proc = subprocess.run(
        [criu, "check", "--feature", "mem_dirty_track"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"criu check failed:\n{proc.stdout}{proc.stderr}"
