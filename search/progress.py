"""One progress line for a sweep: done / running / failed, front size, best feasible accuracy.

A small thread renders it at most once a second from a snapshot of the recorder, so a burst of
events (two trials starting together, thousands of table look-ups) is neither lost nor printed
line by line, and the sweep's own loop never waits on the terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

# (done, running, failed, front, best) of the sweep right now
Snapshot = Callable[[], tuple[int, int, int, int, str]]


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, interval_s: float = 1.0) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self.start = time.monotonic()
        # On a terminal the line updates in place; in a log file each change is one line.
        self.tty = self.stream.isatty()
        self._last = ""
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def follow(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._thread = threading.Thread(target=self._run, name="hwnas-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.render()

    def render(self) -> None:
        if self._snapshot is None:
            return
        done, running, failed, front, best = self._snapshot()
        state = f"[hwnas] {done}/{self.total} done | {running} running | {failed} failed | front {front} | best feasible {best}"
        with self._lock:
            if state == self._last:
                return
            self._last = state
            line = f"{state} | {time.monotonic() - self.start:5.0f}s"
            self.stream.write("\r" + line.ljust(120) if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.render()
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
