"""This machine as a latency target: the protocol run in-process, isolated from trials by the node lock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from hwnas.evaluators.measure.base import MeasureError
from hwnas.evaluators.measure.energy import open_meter
from hwnas.evaluators.measure.fingerprint import device_fingerprint
from hwnas.evaluators.measure.lock import measure_exclusive
from hwnas.evaluators.measure.protocol import (
    PROVIDERS,
    Measurement,
    MeasureProtocol,
    check_counts,
    check_provider,
    make_session,
    target_protocol,
    time_session,
)

AFFINITY = ("auto", "none")


def current_cpu() -> int | None:
    """The core this thread last ran on (field 39 of /proc/thread-self/stat), where the scheduler just
    found room for it; None where that is not readable."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def pinned(threads: int) -> Iterator[tuple[int, ...] | None]:
    """Pin this thread (and the ORT pool threads a session made inside creates) to `threads` allowed cores,
    starting with the one it runs on now (a fixed choice such as the last core collides with whatever
    else sits there); restore the old set afterwards."""
    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux: nothing to pin with
        yield None
        return
    here = current_cpu()
    ordered = ([here] if here in before else []) + sorted(before - {here})
    chosen = tuple(sorted(ordered[:threads]))
    os.sched_setaffinity(0, chosen)
    try:
        yield chosen
    finally:
        os.sched_setaffinity(0, before)


@dataclass(frozen=True)
class LocalTarget:
    """Where and how a model is timed on this machine; built from conf/hardware/*.yaml."""

    name: str
    provider: str
    threads: int = 1
    batch_size: int = 1
    warmup: int = 10  # warm-up runs (and at least MeasureProtocol.warmup_s seconds)
    repeats: int = 30  # timed blocks per round
    block_ms: float = 2.0  # a block of consecutive runs lasts at least this long
    cv_threshold: float = 0.05
    max_rounds: int = 3
    isolate: bool = True  # time under measure_exclusive(): no trial step on this node computes meanwhile
    # none: leave placement to the scheduler; auto: pin to `threads` allowed cores (the current one first)
    # while the session is made and timed. Interleaved on the same files (scripts/bench_protocol.py
    # --compare-affinity) neither was steadier (CV of 10 medians 1.2-1.8% both, when the node was calm), so
    # the default leaves the scheduler free to move the timing thread off a core something else wants.
    affinity: str = "none"
    _fingerprint: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_provider(self.provider)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r} is empty; allowed: a non-empty string")
        check_counts((("threads", self.threads, 1), ("batch_size", self.batch_size, 1), ("warmup", self.warmup, 0),
                      ("repeats", self.repeats, 3), ("max_rounds", self.max_rounds, 1)))
        limits: tuple[tuple[str, float, float], ...] = (
            ("block_ms", self.block_ms, 10_000.0), ("cv_threshold", self.cv_threshold, 10.0),
        )
        for key, number, high in limits:
            if not isinstance(number, (int, float)) or isinstance(number, bool) or not 0 < number <= high:
                raise ValueError(f"{key}={number!r} is invalid; allowed: a number in (0, {high:g}]")
        if not isinstance(self.isolate, bool):
            raise ValueError(f"isolate={self.isolate!r} is invalid; allowed: true, false")
        if self.affinity not in AFFINITY:
            raise ValueError(f"affinity={self.affinity!r} is unknown; allowed: {', '.join(AFFINITY)}")
        self.protocol()  # the protocol's own bounds, named by its keys

    @property
    def ort_provider(self) -> str:
        return PROVIDERS[self.provider]

    def check_available(self) -> None:
        """Raise before any work starts if this ONNX Runtime build cannot run on the target."""
        available = ort.get_available_providers()
        if self.ort_provider not in available:
            raise RuntimeError(
                f"latency target {self.name!r} needs {self.ort_provider}, which this onnxruntime does not "
                f"provide (available: {', '.join(available)})"
            )

    def fingerprint(self) -> dict[str, Any]:
        if not self._fingerprint:  # cached: nvidia-smi and /proc reads once per process
            self._fingerprint.update(device_fingerprint(self.provider))
        return dict(self._fingerprint)

    def protocol(self) -> MeasureProtocol:
        return target_protocol(
            batch_size=self.batch_size, threads=self.threads, warmup=self.warmup, repeats=self.repeats,
            block_ms=self.block_ms, cv_threshold=self.cv_threshold, max_rounds=self.max_rounds,
        )

    def measure(self, onnx_path: str | Path) -> Measurement:
        self.check_available()
        protocol, fp = self.protocol(), self.fingerprint()
        pin = pinned(self.threads) if self.affinity == "auto" and self.provider == "cpu" else nullcontext()
        try:
            with measure_exclusive() if self.isolate else nullcontext(), pin:
                # Made inside the pin: ORT's pool threads inherit the affinity of the thread creating them.
                session = make_session(onnx_path, self.provider, protocol)
                return time_session(session, protocol, fingerprint=fp, energy=open_meter(self.provider))
        except ValueError:
            raise  # the model does not fit the protocol (symbolic dims, batch): the caller's error
        except (RuntimeError, OSError, ort.capi.onnxruntime_pybind11_state.Fail) as e:
            if isinstance(e, MeasureError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MeasureError(f"{Path(onnx_path).name} on {self.name!r}: {first}") from e
