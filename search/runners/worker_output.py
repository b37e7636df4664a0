"""A trial's own output in its folder: `capture_output(trial_dir)` sends what the trial prints, warns and
logs to `trial_dir/log.txt`, so a worker's output is kept instead of dropped (Ray runs with
log_to_driver=False) and a local sweep's terminal keeps only the progress line.

What is captured (Python level: a C library writing to file descriptor 1 or 2 is not):
- sys.stdout / sys.stderr writes (print, tracebacks printed by libraries);
- warnings.warn (the `warnings` module's display hook);
- logging records that reach the root logger, and those of loggers that do not propagate (Lightning's,
  when it set up its own handler), at the levels their loggers let through (Lightning: WARNING);
- the traceback of the exception that ends the trial (the trial's record keeps its one-line error).

`all_threads=False` (the local runner, where the driver shares the process) captures only the calling
thread's output: the driver's other threads (progress line, tracking) keep writing where they did.
Lines are appended and flushed one by one; everything is restored on the way out, exceptions included.
Nothing is created until there is something to write, except that a trial that made its folder
always gets a log.txt (possibly empty): a tabular look-up leaves no files behind.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LazyLog:
    """log.txt opened for appending on the first write, line-buffered; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
            self._file.write(text)
            if "\n" not in text:
                self._file.flush()  # line buffering flushes on newlines; a partial line (progress bars) too
        return len(text)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class _Router:
    """A stand-in for sys.stdout / sys.stderr: the captured threads' writes go to the log, the others'
    to the stream that was there before."""

    def __init__(self, log: _LazyLog, original: TextIO, captured: Any) -> None:
        self._log = log
        self._original = original
        self._captured = captured

    def _target(self) -> Any:
        return self._log if self._captured() else self._original

    def write(self, text: str) -> int:
        return self._target().write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._captured():
            self._original.flush()

    def isatty(self) -> bool:
        return False if self._captured() else self._original.isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ...: those of the original stream
        return getattr(self._original, name)


class _LogHandler(logging.Handler):
    def __init__(self, log: _LazyLog, captured: Any) -> None:
        super().__init__()
        self._log = log
        self.addFilter(lambda record: captured(record.thread))
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._log.write(self.format(record) + "\n")
        except Exception:  # a record that cannot be formatted must not end the trial
            self.handleError(record)


@contextlib.contextmanager
def capture_output(trial_dir: Path, *, all_threads: bool = True) -> Iterator[Path]:
    """Capture the trial's output into trial_dir/log.txt (appended) while the block runs; yields the path.
    An exception leaving the block is written there with its traceback, then raised on unchanged."""
    path = Path(trial_dir) / LOG_NAME
    log = _LazyLog(path)
    owner = threading.get_ident()

    def captured(thread: int | None = None) -> bool:
        return all_threads or (threading.get_ident() if thread is None else thread) == owner

    handler = _LogHandler(log, captured)
    root = logging.getLogger()
    # Loggers that do not propagate never reach the root's handlers: they get ours too, for the trial.
    # A logger made during the trial (a first import of Lightning under the root's handler) propagates.
    islands = [
        logger for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger) and not logger.propagate and logger.handlers
    ]
    original_show = warnings.showwarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if file is None and captured():
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            original_show(message, category, filename, lineno, file, line)

    stdout, stderr = _Router(log, sys.stdout, captured), _Router(log, sys.stderr, captured)
    root.addHandler(handler)
    for logger in islands:
        logger.addHandler(handler)
    try:
        # catch_warnings restores the display hook and the filters afterwards, and entering it resets
        # the "shown once" registries: a warning every trial raises is in every trial's log, not the first's.
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # type: ignore[type-var]
            warnings.showwarning = show
            yield path
    except BaseException:
        log.write("".join(traceback.format_exc()))
        raise
    finally:
        for logger in islands:
            logger.removeHandler(handler)
        root.removeHandler(handler)
        log.close()
        if path.parent.is_dir() and not path.exists():
            path.touch()  # a trial that made its folder always has a log, empty when it said nothing
