"""What this kernel offers for checkpointing, like `criu check`."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from checkpointer.kernel import features, pagemap
from checkpointer.trackers import pick_auto


@dataclass
class Feature:
    name: str
    ok: bool
    detail: str


def check_kernel() -> dict:
    """Every probe, the tracker `auto` picks and why, and whether tracking is incremental."""
    probes = [
        Feature("soft-dirty", *features.probe_soft_dirty()),
        Feature("pagemap-scan", *features.probe_pagemap_scan()),
        Feature(
            "pagemap-scan-soft-dirty",
            *features.probe_pagemap_scan_category(pagemap.PAGE_IS_SOFT_DIRTY),
        ),
        Feature("pagemap-scan-guard", *features.probe_pagemap_scan_category(pagemap.PAGE_IS_GUARD)),
        Feature("uffd-wp-async", *features.probe_uffd_wp_async()),
        Feature("ptrace", *features.probe_ptrace()),
    ]
    tracker, why = pick_auto()
    return {
        "kernel": platform.release(),
        "features": [vars(p) for p in probes],
        "auto_tracker": tracker,
        "auto_reason": why,
        "incremental": tracker in ("soft-dirty", "uffd-wp"),
    }
