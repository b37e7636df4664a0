"""One progress line for a sweep: done / running / failed, front size, best feasible accuracy."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        # On a terminal the line updates in place; in a log file each change is one line.
        self.tty = self.stream.isatty()
        self._last = ""

    def show(self, *, done: int, running: int, failed: int, front: int, best: str) -> None:
        elapsed = time.monotonic() - self.start
        line = (
            f"[hwnas] {done}/{self.total} done | {running} running | {failed} failed | "
            f"front {front} | best feasible {best} | {elapsed:5.0f}s"
        )
        if line[: line.rfind("|")] == self._last[: self._last.rfind("|")]:
            return
        self._last = line
        if self.tty:
            self.stream.write("\r" + line.ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
