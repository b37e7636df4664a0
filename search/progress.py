"""One progress line for a sweep: done / running / failed, front size, best feasible accuracy,
elapsed time and an ETA.

A small thread renders it once a second from a snapshot of the recorder, so a burst of events (two
trials starting together, thousands of table look-ups) is neither lost nor printed line by line, and
the sweep's own loop never waits on the terminal. On a terminal the line (clock included) updates in
place every second; in a log file a line is written when the state changes, or every `heartbeat_s`.
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
    def __init__(
        self, total: int, stream: TextIO | None = None, interval_s: float = 1.0, heartbeat_s: float = 30.0
    ) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.start = time.monotonic()
        self._done_at_start: int | None = None  # a resumed sweep's earlier trials do not count toward the rate
        self._written_at = 0.0
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

    def eta_s(self, done: int, now: float) -> float | None:
        """Seconds left at this session's rate of finished trials; None until one has finished."""
        if self._done_at_start is None:
            self._done_at_start = done
        finished = done - self._done_at_start
        if finished <= 0 or done >= self.total:
            return None if done < self.total else 0.0
        return (now - self.start) / finished * (self.total - done)

    def render(self, force: bool = False) -> None:
        if self._snapshot is None:
            return
        done, running, failed, front, best = self._snapshot()
        now = time.monotonic()
        eta = self.eta_s(done, now)
        state = f"[hwnas] {done}/{self.total} done | {running} running | {failed} failed | front {front} | best feasible {best}"
        with self._lock:
            changed = state != self._last
            if not (self.tty or changed or force or now - self._written_at >= self.heartbeat_s):
                return
            self._last, self._written_at = state, now
            line = f"{state} | {_clock(now - self.start)} elapsed | ETA {_clock(eta) if eta is not None else '-'}"
            self.stream.write("\r" + line.ljust(140) if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.render(force=True)
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
