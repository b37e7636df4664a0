"""Node-wide reader/writer lock between trials that compute and a measurement that times.

Why a lock (not reserved cores or a local agent): this machine has 2 cores, so reserving one for timing
would halve training throughput all the time, while a lock costs only the measurement's own seconds.
Trials hold `compute_slot()` (shared) per training step and release it between steps; a measurement
holds `measure_exclusive()` while it times. Writer preference comes from a gate file: a reader takes the
gate shared only for the instant it needs to take the data lock shared; the writer takes the gate
exclusive (new readers now queue at the gate), then the data lock exclusive (it waits for the steps in
flight to end). So a measurement waits for at most one step per trial, and no step starts while it times.
fcntl.flock locks belong to the open file and vanish when the process dies: a killed trial never
leaves the node locked.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GATE, DATA = "gate.lock", "data.lock"


def lock_dir() -> Path:
    """$HWNAS_LOCK_DIR, else <tmp>/hwnas-locks-<uid> (one per user: another user's trials are not ours)."""
    env = os.environ.get("HWNAS_LOCK_DIR")
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"hwnas-locks-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _open(name: str) -> int:
    return os.open(lock_dir() / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class _State(threading.local):
    """Per thread: how deep in compute_slot / measure_exclusive this thread is (re-entrance)."""

    def __init__(self) -> None:
        self.compute = 0
        self.measure = 0


_state = _State()
# Slots held by this process, across threads: the data lock is taken once per process (flock on two
# descriptors of one process would conflict with itself, and a writer in another process waits for all).
_proc = threading.Lock()
_proc_slots = 0
_proc_fd: int | None = None


@contextmanager
def compute_slot() -> Iterator[None]:
    """Shared: held while a trial computes (one training step). Re-entrant; a no-op inside measure_exclusive()."""
    global _proc_slots, _proc_fd
    if _state.measure or _state.compute:
        _state.compute += 1
        try:
            yield
        finally:
            _state.compute -= 1
        return
    with _proc:
        if _proc_slots == 0:
            gate, data = _open(GATE), _open(DATA)
            try:
                fcntl.flock(gate, fcntl.LOCK_SH)  # queues behind a waiting or timing measurement
                try:
                    fcntl.flock(data, fcntl.LOCK_SH)
                finally:
                    fcntl.flock(gate, fcntl.LOCK_UN)
            except BaseException:
                os.close(data)
                raise
            finally:
                os.close(gate)
            _proc_fd = data
        _proc_slots += 1
    _state.compute += 1
    try:
        yield
    finally:
        _state.compute -= 1
        with _proc:
            _proc_slots -= 1
            if _proc_slots == 0 and _proc_fd is not None:
                fcntl.flock(_proc_fd, fcntl.LOCK_UN)  # explicit: a forked child may share the descriptor
                os.close(_proc_fd)
                _proc_fd = None


@contextmanager
def measure_exclusive() -> Iterator[None]:
    """Exclusive: held while timing. Waits for in-flight compute slots; holds back new ones. Re-entrant."""
    if _state.measure:
        _state.measure += 1
        try:
            yield
        finally:
            _state.measure -= 1
        return
    if _state.compute:
        raise RuntimeError("measure_exclusive() inside compute_slot(): it would wait for itself; "
                           "allowed: measure between compute steps")
    gate = _open(GATE)
    data = -1
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        data = _open(DATA)
        fcntl.flock(data, fcntl.LOCK_EX)
        _state.measure += 1
        try:
            yield
        finally:
            _state.measure -= 1
    finally:
        if data >= 0:
            fcntl.flock(data, fcntl.LOCK_UN)
            os.close(data)
        fcntl.flock(gate, fcntl.LOCK_UN)
        os.close(gate)
