"""Progress: a batch's progress for people. A bar redrawn in place on a terminal; a plain line
every few seconds otherwise (logs, CI), so a pipe is not flooded with carriage returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from ..batches.views import BatchView

__all__ = ["Progress", "line"]

BAR_WIDTH = 30


def line(view: BatchView, rate: float | None, *, bar: bool) -> str:
    """``[#####.....] 1200/10000 done, 3 failed, 240.0/s, ~37s left`` (the bar only if ``bar``)."""
    done, total = view.finished, max(view.total, 1)
    parts = [f"{done}/{view.total} done", f"{view.failed} failed"]
    if view.cancelled:
        parts.append(f"{view.cancelled} cancelled")
    if rate is not None:
        parts.append(f"{rate:.1f}/s")
        if rate > 0 and view.pending:
            parts.append(f"~{_duration(view.pending / rate)} left")
    text = ", ".join(parts)
    if not bar:
        return f"batch {view.id}: {view.status}: {text}"
    filled = round(BAR_WIDTH * done / total)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


class Progress:
    """Called with each polled view (``wait_for_batch(on_progress=...)``); writes to ``out``."""

    def __init__(
        self, out: TextIO, *, tty: bool, every: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.out, self.tty, self.every, self.clock = out, tty, every, clock
        self._start: tuple[float, int] | None = None
        self._last_line = float("-inf")
        self._drawn = False

    def __call__(self, view: BatchView) -> None:
        now = self.clock()
        if self._start is None:
            self._start = (now, view.finished)
        began, finished_then = self._start
        rate = (view.finished - finished_then) / (now - began) if now > began else None
        if self.tty:
            self.out.write("\r\x1b[2K" + line(view, rate, bar=True))
            self._drawn = True
        elif view.done or now - self._last_line >= self.every:
            self.out.write(line(view, rate, bar=False) + "\n")
            self._last_line = now
        self.out.flush()

    def close(self) -> None:
        """End the bar's line, so what follows starts on its own."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False
