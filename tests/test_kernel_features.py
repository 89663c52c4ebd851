"""Kernel feature probes: shape, speed, and what this machine is known to have."""

from __future__ import annotations

import os

import pytest

from checkpointer.kernel import features
from checkpointer.kernel import pagemap as pm


def test_probes_return_ok_and_reason_and_leave_nothing():
    fds_before = set(os.listdir("/proc/self/fd"))
    maps_before = open("/proc/self/maps").read().count("\n")
    results = features.probe_all()
    for name, (ok, reason) in results.items():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason, name
    assert set(os.listdir("/proc/self/fd")) == fds_before  # nothing left open
    assert abs(open("/proc/self/maps").read().count("\n") - maps_before) <= 1


def test_ptrace_probe():
    assert features.probe_ptrace() == (True, "PTRACE_SEIZE/INTERRUPT work")


@pytest.mark.pagemap_scan
def test_pagemap_scan_categories():
    assert features.probe_pagemap_scan()[0]
    # PAGE_IS_GUARD came in 6.14 (Debian's 6.12 refuses it: EINVAL); the dumper only
    # reports it, so either answer is right, but nothing else may come back.
    ok, reason = features.probe_pagemap_scan_category(pm.PAGE_IS_GUARD)
    assert ok or "EINVAL" in reason, reason
    assert features.probe_pagemap_scan_category(pm.PAGE_IS_SOFT_DIRTY)[0]
    ok, reason = features.probe_pagemap_scan_category(1 << 40)  # no such category
    assert not ok and "EINVAL" in reason


@pytest.mark.uffd_wp
def test_uffd_wp_probe():
    assert features.probe_uffd_wp_async()[0]


@pytest.mark.softdirty
def test_soft_dirty_probe_positive():
    ok, reason = features.probe_soft_dirty()
    assert ok, reason
