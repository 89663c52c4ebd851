"""The kernel-side cost of one tracker iteration: query and reset of dirty pages
over an idle target, measured in-process (no interpreter start, no image writing).

    python3 scripts/bench_lib/scancost.py [--mb 4096] [--tracker soft-dirty|uffd-wp|full]

Prints one JSON line: ms per GiB tracked for the whole scan (present pages, dirty
pages, reset) and for the dirty query + reset alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from targetlib import start_target  # noqa: E402

from checkpointer.collect import read_vmas  # noqa: E402
from checkpointer.kernel import pagemap  # noqa: E402
from checkpointer.trackers import make_tracker  # noqa: E402
from checkpointer.vmas import Policy  # noqa: E402


def measure(mb: int, tracker_name: str, rounds: int = 5) -> dict:
    target = start_target("--anon-mb", str(mb), "--threads", "1")
    try:
        tracker = make_tracker(tracker_name)
        vmas = [v for v in read_vmas(target.pid) if v.policy is Policy.PRIVATE]
        tracker.attach(target.pid, {}, None)
        tracker.scan(target.pid, vmas, incremental=False)  # first pass: register, reset
        vmas = [v for v in read_vmas(target.pid) if v.policy is Policy.PRIVATE]
        whole, query = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            tracker.scan(target.pid, vmas, incremental=True)
            whole.append(time.perf_counter() - started)
            started = time.perf_counter()
            _query_and_reset(tracker_name, target.pid, vmas)
            query.append(time.perf_counter() - started)
        tracker.close()
        gib = sum(v.size for v in vmas) / 2**30
        return {
            "tracker": tracker_name,
            "gib_tracked": round(gib, 2),
            "scan_ms_per_gib": statistics.median(whole) * 1000 / gib,
            "query_reset_ms_per_gib": statistics.median(query) * 1000 / gib,
        }
    finally:
        target.kill()


def _query_and_reset(tracker: str, pid: int, vmas) -> None:
    """The dirty query and reset alone, as each tracker does it."""
    with pagemap.Pagemap(pid) as pm:
        for vma in vmas:
            if tracker == "uffd-wp":
                pm.written_and_protect(vma.start, vma.end)
            elif tracker == "soft-dirty":
                pm.data_and_soft_dirty(vma.start, vma.end)
    if tracker == "soft-dirty":
        pagemap.clear_soft_dirty(pid)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=4096)
    ap.add_argument("--tracker", default="uffd-wp")
    args = ap.parse_args()
    print(json.dumps(measure(args.mb, args.tracker)))
