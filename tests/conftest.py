"""Shared fixtures, and the skip rules for tests that need a kernel feature.

A test marked with a feature (softdirty, uffd_wp, pagemap_scan) skips with a
reason naming that feature when this kernel lacks it. scripts/test runs them
again inside QEMU guests whose kernels have the features (softdirty in 6.1; all
three in 6.12), and fails if they were skipped there.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from targetlib import Target, start_target  # noqa: E402


@functools.cache
def _feature(name: str) -> tuple[bool, str]:
    from checkpointer.kernel import features

    probe = {
        "softdirty": features.probe_soft_dirty,
        "uffd_wp": features.probe_uffd_wp_async,
        "pagemap_scan": features.probe_pagemap_scan,
    }[name]
    return probe()


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in ("softdirty", "uffd_wp", "pagemap_scan"):
        if item.get_closest_marker(name):
            ok, reason = _feature(name)
            if not ok:
                pytest.skip(f"needs kernel feature {name}: {reason}")


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test keeps its tracking state and locks to itself (subprocesses inherit it)."""
    state = tmp_path / "state"
    monkeypatch.setenv("CHECKPOINTER_STATE_DIR", str(state))
    return state


@pytest.fixture(autouse=True)
def committed_dumps_verify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Every complete dump a test leaves under tmp_path passes `verify`, whole chain
    included: a committed dump whose parent references do not resolve is the worst
    defect this tool can have, and it would otherwise surface only at restore time.
    Tests that damage images on purpose are marked `damages_images`."""
    yield
    if request.node.get_closest_marker("damages_images"):
        return
    from checkpointer.errors import ImageError
    from checkpointer.images.reader import is_complete_dump
    from checkpointer.images.verify import verify_dump

    for inventory in sorted(tmp_path.rglob("inventory")):
        path = inventory.parent
        if any(part.startswith(".") for part in path.relative_to(tmp_path).parts):
            continue  # an uncommitted temp dir
        if not is_complete_dump(str(path)):
            continue
        try:
            verify_dump(str(path))
        except ImageError as err:
            pytest.fail(f"committed dump {path} does not verify: {err}")


@pytest.fixture
def spawn() -> Iterator[Callable[..., Target]]:
    """Start test targets; every one still alive is killed at teardown."""
    started: list[Target] = []

    def _spawn(*args: str) -> Target:
        target = start_target(*args)
        started.append(target)
        return target

    yield _spawn
    for target in started:
        target.kill()


@pytest.fixture
def mapped_file(tmp_path: Path) -> Path:
    """A 64 KiB file for the target's private file mapping."""
    path = tmp_path / "mapped.bin"
    path.write_bytes(bytes(range(256)) * 256)
    return path
