"""The timing protocol: how an ONNX file is timed so that 30 µs models rank reliably, and what is recorded.

Imports only numpy, onnxruntime and the stdlib (plus fingerprint/energy, which import less): the device
agent runs it too. Why blocks: at 30 µs per call, a single-run sample is dominated by per-call overhead,
timer reads and whatever the core did just before. Runs are timed one by one inside blocks of k
consecutive runs lasting >= block_s (k calibrated in warm-up): the median over all runs is the latency,
and the blocks (equal in duration whatever the model) are the samples its spread is judged from.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from hwnas.evaluators.measure.energy import EnergyMeter
from hwnas.evaluators.measure.fingerprint import device_fingerprint, fingerprint_id

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
GRAPH_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# ONNX tensor element types an input may have, and the array fed for each.
DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# (type, low, high): bounds also keep an agent's query parameters from asking for hour-long measurements.
_BOUNDS: dict[str, tuple[type, float, float]] = {
    "batch_size": (int, 1, 65536),
    "threads": (int, 1, 1024),
    "warmup_runs": (int, 0, 1_000_000),
    "warmup_s": (float, 0.0, 60.0),
    "block_s": (float, 1e-5, 10.0),
    "blocks": (int, 3, 100_000),
    "cv_threshold": (float, 1e-4, 10.0),
    "max_rounds": (int, 1, 100),
    "quiet_share": (float, 0.0, 1.0),
    "quiet_wait_s": (float, 0.0, 600.0),
}
_Z95 = 1.959964
# sd(median) ~ 1.2533 sd/sqrt(n) for a normal sample; sd ~ 1.4826 MAD (robust to the odd disturbed block).
_MEDIAN_SE = 1.2533 * 1.4826


@dataclass(frozen=True)
class MeasureProtocol:
    batch_size: int = 1
    threads: int = 1  # intra-op threads; inter-op 1, sequential execution
    warmup_runs: int = 10  # at least this many warm-up runs ...
    warmup_s: float = 0.05  # ... and at least this long (caches, branch predictors, clocks settle)
    block_s: float = 0.002  # a timed sample = a block of k consecutive runs lasting >= block_s
    blocks: int = 30  # timed blocks per round
    cv_threshold: float = 0.05  # round repeated while the CV of the block medians is above this ...
    max_rounds: int = 3  # ... up to this many rounds (lowest-CV round kept; all rounds counted)
    graph_optimization: str = "all"  # all | extended | basic | disabled
    # A round is disturbed when, at more than quiet_share of its block boundaries, more tasks were
    # runnable on this machine than the session's threads (/proc/loadavg): on 2 vCPUs a busy neighbour
    # slows a 30 µs model by 60-80% (measured in a sweep) without preempting it, so the CV cannot see
    # it. Disturbed rounds are timed again, waiting up to quiet_wait_s in all for a quiet machine;
    # quiet_share 1 turns the check off.
    quiet_share: float = 0.2
    quiet_wait_s: float = 3.0

    def __post_init__(self) -> None:
        for key, (kind, low, high) in _BOUNDS.items():
            value = getattr(self, key)
            ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if not ok_type or isinstance(value, bool) or not (low <= value <= high) or value != value:
                what = "an int" if kind is int else "a number"
                raise ValueError(f"{key}={value!r} is invalid; allowed: {what} in [{low:g}, {high:g}]")
            if kind is float:
                object.__setattr__(self, key, float(value))
        if self.graph_optimization not in GRAPH_LEVELS:
            raise ValueError(
                f"graph_optimization={self.graph_optimization!r} is unknown; allowed: {', '.join(GRAPH_LEVELS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeasureProtocol:
        """Validated; accepts the strings of query() back (HTTP query parameters)."""
        allowed = [*_BOUNDS, "graph_optimization"]
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in allowed:
                raise ValueError(f"{key}: this protocol key is unknown; allowed: {', '.join(allowed)}")
            if isinstance(value, str) and key in _BOUNDS:
                kind = _BOUNDS[key][0]
                try:
                    value = int(value) if kind is int else float(value)
                except ValueError:
                    raise ValueError(f"{key}={value!r} is not a number; allowed: {kind.__name__}") from None
            kwargs[key] = value
        return cls(**kwargs)

    def key(self) -> str:
        """Short stable hash of the protocol (a cache key part)."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def query(self) -> dict[str, str]:
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in self.to_dict().items()}


# ---- what the targets (local.py, remote.py) share: their config keys and the protocol they describe ----


def check_provider(provider: Any) -> None:
    if provider == "gpu":
        raise ValueError("provider='gpu' is ambiguous; allowed: cpu, cuda (say 'cuda' for NVIDIA GPUs)")
    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r} is unknown; allowed: {', '.join(PROVIDERS)}")


def check_counts(fields: Iterable[tuple[str, Any, int]]) -> None:
    """(config key, value, lowest allowed) of integer settings: one line naming the key otherwise."""
    for key, value, low in fields:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key}={value!r} is invalid; allowed: an int >= {low}")


def target_protocol(
    *, batch_size: int, threads: int, warmup: int, repeats: int, block_ms: float, cv_threshold: float, max_rounds: int
) -> MeasureProtocol:
    """The protocol a target's conf/hardware keys describe (warmup runs, `repeats` blocks of >= block_ms);
    a value out of the protocol's own bounds is named by the protocol's key."""
    try:
        return MeasureProtocol(
            batch_size=batch_size, threads=threads, warmup_runs=warmup, block_s=block_ms / 1000, blocks=repeats,
            cv_threshold=cv_threshold, max_rounds=max_rounds,
        )
    except ValueError as e:
        raise ValueError(f"hardware: {e}") from None


# Measurement fields and the JSON types from_dict accepts for them.
_NUM, _INT, _STR = (int, float), (int,), (str,)
_MEASUREMENT_TYPES: dict[str, tuple[type, ...]] = {
    "median_ms": _NUM, "p90_ms": _NUM, "p99_ms": _NUM, "mean_ms": _NUM, "std_ms": _NUM, "cv": _NUM,
    "resolution_pct": _NUM, "n_runs": _INT, "n_blocks": _INT, "runs_per_block": _INT, "rounds": _INT,
    "provider": _STR, "intra_op_threads": _INT, "input_shape": (list, tuple), "output_shape": (list, tuple),
    "protocol": (dict,), "fingerprint": (dict,), "device_id": _STR, "energy_j": (int, float, type(None)),
    "energy_source": _STR, "source": _STR, "others_share": (int, float, type(None)), "disturbed": (bool,),
}


@dataclass(frozen=True)
class Measurement:
    median_ms: float  # median over the kept round's single runs (see round_stats for why)
    p90_ms: float  # percentiles over the kept round's single runs: the tail a single request sees
    p99_ms: float
    mean_ms: float  # over the kept round's single runs
    std_ms: float
    cv: float  # coefficient of variation of the kept round's block medians
    resolution_pct: float  # ~95% CI half-width of the median, % of the median
    n_runs: int
    n_blocks: int
    runs_per_block: int
    rounds: int
    provider: str
    intra_op_threads: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    protocol: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    device_id: str = ""
    energy_j: float | None = None  # joules per inference, only from a real meter
    energy_source: str = "none"  # "rapl" | "nvml" | "none"
    source: str = "measured"  # "measured" | "cache" | "predicted"
    # Share of the kept round's block boundaries at which other tasks were runnable (None where
    # /proc/loadavg is absent), and whether it stayed above quiet_share until quiet_wait_s ran out.
    others_share: float | None = None
    disturbed: bool = False

    @property
    def n(self) -> int:
        """Old name of n_runs (LatencyStats.n), kept for callers written before issue 11."""
        return self.n_runs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"], d["output_shape"] = list(self.input_shape), list(self.output_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        if not isinstance(d, dict):
            raise ValueError(f"measurement: {type(d).__name__} is wrong; allowed: a dict")
        unknown = sorted(set(d) - set(_MEASUREMENT_TYPES))
        if unknown:
            raise ValueError(f"measurement: keys {', '.join(unknown)} are unknown; allowed: Measurement fields")
        required = [k for k in _MEASUREMENT_TYPES if k not in d and k not in _OPTIONAL]
        if required:
            raise ValueError(f"measurement: keys {', '.join(required)} are missing; allowed: Measurement.to_dict()")
        for key, value in d.items():
            types = _MEASUREMENT_TYPES[key]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise ValueError(f"measurement: {key}={value!r} has the wrong type; allowed: "
                                 f"{' or '.join(t.__name__ for t in types)}")
        kwargs = dict(d)
        for key in ("input_shape", "output_shape"):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in kwargs[key]):
                raise ValueError(f"measurement: {key}={kwargs[key]!r} is wrong; allowed: a list of ints")
            kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


_OPTIONAL = {"protocol", "fingerprint", "device_id", "energy_j", "energy_source", "source", "others_share", "disturbed"}


def runnable_tasks() -> int | None:
    """Tasks runnable on this machine right now (the 4th field of /proc/loadavg, `running/total`),
    the caller included; None off Linux. ~10 µs: read between timed blocks, never inside one."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None


def make_session(model: str | Path | bytes, provider: str, protocol: MeasureProtocol) -> ort.InferenceSession:
    """A session with a fixed thread budget and one request at a time: the deployment setting timed."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r} is unknown; allowed: {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise RuntimeError(f"provider {provider!r} needs {wanted}, which this onnxruntime does not provide "
                           f"(available: {', '.join(available)})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = protocol.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = GRAPH_LEVELS[protocol.graph_optimization]
    options.log_severity_level = 3
    # No session.intra_op_thread_affinities: it takes logical processor ids per pool thread, fails on ids
    # outside the process's allowed set (containers, Ray) and differs per device. A caller that wants
    # pinning sets the process affinity before the session is made; pool threads inherit it.
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=options, providers=[wanted])
    if session.get_providers()[0] != wanted:  # ORT falls back to CPU when the CUDA EP fails to load
        raise RuntimeError(f"provider {provider!r}: onnxruntime made a {session.get_providers()[0]} session "
                           f"instead of {wanted}; a latency is never taken from another device")
    return session


def _input(session: ort.InferenceSession, batch_size: int) -> tuple[str, np.ndarray]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"model inputs: {len(inputs)} is wrong; allowed: exactly one input")
    inp = inputs[0]
    if inp.type not in DTYPES:
        raise ValueError(f"input {inp.name}: type {inp.type} is unsupported; allowed: {', '.join(DTYPES)}")
    if not inp.shape:
        raise ValueError(f"input {inp.name}: shape {inp.shape} is wrong; allowed: a batch dim first")
    first, rest = inp.shape[0], inp.shape[1:]
    if isinstance(first, int) and first != batch_size:
        raise ValueError(f"input {inp.name}: batch dim {first} is fixed and != batch_size {batch_size}; "
                         "allowed: a symbolic batch dim or batch_size equal to it")
    for i, dim in enumerate(rest, start=1):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"input {inp.name}: dim {i} is {dim!r}; allowed: fixed sizes after the batch dim")
    shape = (batch_size, *rest)
    rng = np.random.default_rng(0)  # fixed: timing must not depend on global RNG state
    dtype = DTYPES[inp.type]
    x: np.ndarray
    if np.issubdtype(dtype, np.floating):
        x = rng.standard_normal(shape).astype(dtype)
    else:
        x = rng.integers(0, 2, size=shape).astype(dtype)
    return inp.name, x


def _run_blocks(run: Any, blocks: int, k: int, threads: int = 1) -> tuple[np.ndarray, float | None]:
    """blocks*k consecutive runs: the timestamps before the first and after each run (ns, the time spent
    sampling between blocks taken out), and the share of block boundaries at which more tasks than the
    session's `threads` were runnable (another process computing beside the timing)."""
    now = time.perf_counter_ns
    stamps = [0] * (blocks * k + 1)
    busy, seen, offset = 0, 0, 0
    stamps[0] = now()
    i = 0
    for _ in range(blocks):
        g0 = now()
        running = runnable_tasks()
        offset += now() - g0
        if running is not None:
            seen += 1
            busy += running > threads
        for _ in range(k):
            run()
            i += 1
            stamps[i] = now() - offset
    return np.asarray(stamps, dtype=np.int64), (busy / seen if seen else None)


def round_stats(stamps: np.ndarray, k: int) -> dict[str, Any]:
    """Statistics of one round from its timestamps (blocks of k runs).

    median over every single run of the round (thousands for a 30 µs model): a preemption or interrupt
    slows one run, not the median; measured here under a load of 3 on 2 cores, the median of 10 repeats
    varied by 0.35% this way and by 15% as the median of block means. Each block is summarised by its own
    median, so the blocks' spread (cv, resolution) is the spread of the statistic reported, and it moves
    with what does shift the median (a co-runner sharing caches, a clock change), not with preemptions.
    """
    per_run = np.diff(stamps) / 1e6
    n = len(per_run) // k
    block_medians = np.median(per_run[: n * k].reshape(n, k), axis=1)
    median = float(np.median(per_run))
    mad = float(np.median(np.abs(block_medians - np.median(block_medians))))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(per_run, 90)),
        "p99_ms": float(np.percentile(per_run, 99)),
        "mean_ms": float(per_run.mean()),
        "std_ms": float(per_run.std()),
        "cv": float(block_medians.std(ddof=1) / block_medians.mean()),
        "resolution_pct": float(100 * _Z95 * _MEDIAN_SE * mad / math.sqrt(n) / median),
        "n_runs": int(len(per_run)),
        "n_blocks": n,
    }


def _warm_up_and_calibrate(run: Any, protocol: MeasureProtocol) -> int:
    """Warm up (runs and seconds); return k, the runs per block that last >= block_s."""
    now = time.perf_counter_ns
    times: list[int] = []
    start = now()
    deadline = start + int(protocol.warmup_s * 1e9)
    last = start
    while len(times) < max(protocol.warmup_runs, 3) or last < deadline:
        run()
        t = now()
        times.append(t - last)
        last = t
    # The latter half: the first runs allocate and fault pages in; they would shrink k.
    per_run = float(np.median(times[len(times) // 2:]))
    return max(1, math.ceil(protocol.block_s * 1e9 / max(per_run, 1.0)))


def time_session(
    session: ort.InferenceSession,
    protocol: MeasureProtocol,
    *,
    fingerprint: dict[str, Any],
    energy: EnergyMeter | None = None,
) -> Measurement:
    """Warm up, calibrate k, then rounds of `blocks` blocks of k runs until the blocks' CV is <= threshold."""
    name, x = _input(session, protocol.batch_size)
    feed = {name: x}
    sess_run = session.run
    out = sess_run(None, feed)  # also checks that the model runs at all before any timing

    def run() -> None:
        sess_run(None, feed)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a block is an outlier the model did not cause
    try:
        k = _warm_up_and_calibrate(run, protocol)
        best: dict[str, Any] | None = None
        rounds = quiet_rounds = 0
        deadline = time.monotonic() + protocol.quiet_wait_s
        pause = 0.02
        while True:
            rounds += 1
            e0 = energy.read_j() if energy is not None else None
            stamps, others = _run_blocks(run, protocol.blocks, k, protocol.threads)
            e1 = energy.read_j() if energy is not None else None
            stats = round_stats(stamps, k)
            stats["energy_j"] = (
                (e1 - e0) / (stats["n_runs"] * protocol.batch_size) if e0 is not None and e1 is not None else None
            )
            stats["others_share"] = others
            stats["disturbed"] = others is not None and others > protocol.quiet_share
            # Quiet rounds beat disturbed ones; among equals the steadier (lower CV) one is kept.
            if best is None or (best["disturbed"], best["cv"]) > (stats["disturbed"], stats["cv"]):
                best = stats
            if stats["disturbed"]:
                if time.monotonic() + pause > deadline:
                    break  # no quiet moment in quiet_wait_s: the least bad round, marked disturbed
                time.sleep(pause)  # let the neighbour's burst pass (imports, a process starting)
                pause = min(2 * pause, 0.5)
                continue
            quiet_rounds += 1
            if stats["cv"] <= protocol.cv_threshold or quiet_rounds >= protocol.max_rounds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    assert best is not None
    return Measurement(
        median_ms=best["median_ms"], p90_ms=best["p90_ms"], p99_ms=best["p99_ms"], mean_ms=best["mean_ms"],
        std_ms=best["std_ms"], cv=best["cv"], resolution_pct=best["resolution_pct"], n_runs=best["n_runs"],
        n_blocks=best["n_blocks"], runs_per_block=k, rounds=rounds,
        provider=session.get_providers()[0],
        intra_op_threads=int(session.get_session_options().intra_op_num_threads),
        input_shape=tuple(int(d) for d in x.shape),
        output_shape=tuple(int(d) for d in np.shape(out[0])),
        protocol=protocol.to_dict(), fingerprint=fingerprint, device_id=fingerprint_id(fingerprint),
        energy_j=best["energy_j"],
        energy_source=energy.source if energy is not None and best["energy_j"] is not None else "none",
        others_share=best["others_share"], disturbed=bool(best["disturbed"]),
    )


def measure_file(
    model: str | Path | bytes,
    provider: str,
    protocol: MeasureProtocol,
    *,
    fingerprint: dict[str, Any] | None = None,
    energy: EnergyMeter | None = None,
) -> Measurement:
    session = make_session(model, provider, protocol)
    fp = fingerprint if fingerprint is not None else device_fingerprint(provider)
    return time_session(session, protocol, fingerprint=fp, energy=energy)
