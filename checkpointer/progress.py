"""A one-line progress bar on stderr when stderr is a terminal; silent otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_pages: int, page_size: int, enabled: bool | None = None) -> None:
        self.total = max(total_pages, 1)
        self.page_size = page_size
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._last = 0.0

    def advance(self, pages: int) -> None:
        self.done += pages
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        mb = self.done * self.page_size / 1e6
        rate = mb / max(now - self._started, 1e-6)
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r[{bar:<30}] {self.done}/{self.total} pages {mb:8.1f} MB {rate:7.1f} MB/s"
        )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
