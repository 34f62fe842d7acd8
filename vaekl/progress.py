"""Progress lines with a rate and an ETA, at most one per ``every`` seconds (never a flood)."""

from __future__ import annotations

import time
from collections.abc import Callable

import logging as pylogging

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Counts ``done`` of ``total`` units and logs ``what: done/total unit (rate unit/s), elapsed, ETA``.

    A line is written when ``every`` seconds have passed since the last one (and by
    :meth:`finish`); ``every=None`` writes nothing. ``log`` and ``clock`` are injectable
    (tests).
    """

    def __init__(self, what: str, total: int, unit: str = "images", every: float | None = 10.0,
                 log: Callable[..., None] | None = None, clock: Callable[[], float] = time.perf_counter):
        if total < 0:
            raise ValueError(f"Progress {what!r}: total must be >= 0, got {total}")
        self.what, self.total, self.unit, self.every = what, int(total), unit, every
        self.log = log or (lambda *a: LOG.info(*a))  # looked up per line (absl's, or a patched one)
        self.clock = clock
        self.done = 0
        self.start = self.last = clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def line(self) -> str:
        elapsed = self.elapsed
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({rate:,.0f} {self.unit}/s), "
                f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(max(eta, 0.0))}")

    def update(self, n: int) -> None:
        """Adds ``n`` units; logs a line if ``every`` seconds passed since the last."""
        self.done += int(n)
        now = self.clock()
        if self.every is not None and now - self.last >= self.every:
            self.last = now
            self.log("%s", self.line())

    def finish(self, extra: str = "") -> float:
        """Logs the final line (``what: done in T (n unit)``) and returns the elapsed seconds."""
        elapsed = self.elapsed
        if self.every is not None:
            self.log("%s: done in %s (%s %s)%s", self.what, format_seconds(elapsed), f"{self.done:,}",
                     self.unit, extra)
        return elapsed
