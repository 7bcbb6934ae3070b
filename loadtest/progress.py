"""A dependency-free progress bar on stderr (redraws in place on a terminal, prints sparse lines otherwise)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", *, stream=None, enabled: bool = True):
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_pct = -1

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        pct = int(100 * done / self.total)
        # Off a terminal (CI logs), print only every 10 %.
        if not self.tty and (pct // 10 == self._last_pct // 10 and done < self.total):
            return
        self._last_pct = pct
        width = 30
        filled = int(width * done / self.total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {pct:3d}% {elapsed:5.1f}s eta {eta:5.1f}s {note}"
        if self.tty:
            self.stream.write("\r" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
