"""Kernel feature probes: each returns (ok, reason) and leaves nothing behind.

Used by `checkpointer check` and by the test suite to skip tests a kernel cannot run.
All probes act on this process (or a short-lived child) only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

from checkpointer.kernel import pagemap as pm
from checkpointer.kernel import ptrace
from checkpointer.kernel.syscalls import mmap_anon, munmap

Probe = tuple[bool, str]


def probe_soft_dirty() -> Probe:
    """CRIU's probe on ourselves: write a page, clear_refs 4, write again, bit 55 set?"""
    size = pm.PAGE_SIZE
    try:
        addr = mmap_anon(size)
    except OSError as exc:
        return False, f"mmap failed: {exc}"
    try:
        ctypes.c_char.from_address(addr).value = b"a"
        try:
            pm.clear_soft_dirty(os.getpid())
        except OSError as exc:
            return False, f"/proc/self/clear_refs: {exc.strerror}"
        ctypes.c_char.from_address(addr).value = b"b"
        entry = int.from_bytes(pm.read_pagemap(os.getpid(), addr, addr + size), "little")
    finally:
        munmap(addr, size)
    if not entry & pm.PM_PRESENT:
        return False, "probe page not present after writing it"
    if entry & pm.PM_SOFT_DIRTY:
        return True, "soft-dirty bit set after clear_refs + write"
    return False, "soft-dirty bit not set after write (kernel without CONFIG_MEM_SOFT_DIRTY)"


def _scan_self(category_mask: int, return_mask: int) -> Probe:
    size = pm.PAGE_SIZE
    addr = mmap_anon(size)
    try:
        ctypes.c_char.from_address(addr).value = b"a"
        with pm.Pagemap(os.getpid()) as pmap:
            regions = pmap.scan(
                addr, addr + size, category_mask=category_mask, return_mask=return_mask
            )
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return False, f"PAGEMAP_SCAN refused ({errno.errorcode.get(exc.errno)})"
        return False, f"PAGEMAP_SCAN failed: {exc}"
    finally:
        munmap(addr, size)
    return True, f"PAGEMAP_SCAN works ({len(regions)} region(s) on a probe page)"


def probe_pagemap_scan() -> Probe:
    """PAGEMAP_SCAN ioctl (6.7+) answering a PRESENT scan of a page we wrote."""
    ok, reason = _scan_self(pm.PAGE_IS_PRESENT, pm.PAGE_IS_PRESENT)
    if ok and "(1 region" not in reason:
        return False, "PAGEMAP_SCAN did not report a present page"
    return ok, reason


def probe_pagemap_scan_category(category: int) -> Probe:
    """Does PAGEMAP_SCAN accept this category bit (EINVAL if the kernel does not know it)?

    Accepting SOFT_DIRTY does not mean soft-dirty works: the kernel knows the bit even
    without CONFIG_MEM_SOFT_DIRTY (then it just never matches).
    """
    ok, reason = _scan_self(category, category)
    return ok, (f"category {category:#x} accepted" if ok else reason)


def probe_uffd_wp_async() -> Probe:
    """userfaultfd (user-mode only) with WP_ASYNC|WP_UNPOPULATED, registering a page in WP mode."""
    from checkpointer.kernel import uffd

    try:
        fd = uffd.open_own_uffd()
    except OSError as exc:
        return False, f"userfaultfd(): {exc.strerror}"
    try:
        try:
            uffd.uffd_api(fd, uffd.UFFD_FEATURE_WP_ASYNC | uffd.UFFD_FEATURE_WP_UNPOPULATED)
        except OSError as exc:
            return False, f"UFFDIO_API with WP_ASYNC|WP_UNPOPULATED: {exc.strerror}"
        addr = mmap_anon(pm.PAGE_SIZE)
        try:
            if not uffd.register_wp(fd, addr, pm.PAGE_SIZE):
                return False, "UFFDIO_REGISTER (MODE_WP) refused an anonymous page"
            uffd.unregister(fd, addr, pm.PAGE_SIZE)
        except OSError as exc:
            return False, f"UFFDIO_REGISTER (MODE_WP): {exc.strerror}"
        finally:
            munmap(addr, pm.PAGE_SIZE)
    finally:
        os.close(fd)
    return True, "userfaultfd write-protect (async) works"


def probe_ptrace() -> Probe:
    """PTRACE_SEIZE + INTERRUPT a forked child, then kill it."""
    pid = os.fork()
    if pid == 0:  # child: wait to be killed
        try:
            while True:
                signal.pause()
        finally:
            os._exit(0)
    try:
        ptrace.seize(pid)
        ptrace.interrupt(pid)
        stop = ptrace.wait_stop(pid, 2.0)
        if stop.kind != "event-stop":
            return False, f"unexpected stop after PTRACE_INTERRUPT: {stop}"
        return True, "PTRACE_SEIZE/INTERRUPT work"
    except Exception as exc:  # the probe reports, it does not raise
        return False, str(exc)
    finally:
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0x40000000)
        except ChildProcessError:
            pass


def probe_all() -> dict[str, Probe]:
    return {
        "ptrace": probe_ptrace(),
        "soft_dirty": probe_soft_dirty(),
        "pagemap_scan": probe_pagemap_scan(),
        "pagemap_scan_soft_dirty": probe_pagemap_scan_category(pm.PAGE_IS_SOFT_DIRTY),
        "pagemap_scan_guard": probe_pagemap_scan_category(pm.PAGE_IS_GUARD),
        "uffd_wp_async": probe_uffd_wp_async(),
    }
