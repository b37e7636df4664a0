"""Latency of an ONNX file measured with ONNX Runtime on a named target (CPU threads or CUDA)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class LatencyTarget:
    """Where and how a model is timed; built from conf/hardware/*.yaml."""

    name: str
    provider: str
    threads: int
    batch_size: int
    warmup: int
    repeats: int

    def __post_init__(self) -> None:
        if self.provider == "gpu":
            raise ValueError("provider='gpu' is ambiguous; allowed: cpu, cuda (say 'cuda' for NVIDIA GPUs)")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider={self.provider!r} is unknown; allowed: {', '.join(PROVIDERS)}")
        if not self.name:
            raise ValueError(f"name={self.name!r} is empty; allowed: a non-empty string")
        for key, value, low in (
            ("threads", self.threads, 1),
            ("batch_size", self.batch_size, 1),
            ("warmup", self.warmup, 0),
            ("repeats", self.repeats, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key}={value!r} is invalid; allowed: an int >= {low}")

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


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    n: int
    # How the timed runs ran, as read back from the session and the runs themselves (not the target):
    provider: str = ""  # the session's first execution provider
    intra_op_threads: int = 0  # the session's intra-op thread budget
    input_shape: tuple[int, ...] = ()  # the array fed to every run (batch first)
    output_shape: tuple[int, ...] = ()  # the first output of the last timed run


def _session(onnx_path: Path, target: LatencyTarget) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One request at a time with a fixed thread budget: the deployment setting being optimised for.
    options.intra_op_num_threads = target.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=[target.ort_provider])


def measure_latency(
    onnx_path: str | Path, target: LatencyTarget, input_shape: tuple[int, int, int]
) -> LatencyStats:
    """Time `repeats` single-batch runs after `warmup` runs, on a fixed random input."""
    target.check_available()
    session = _session(Path(onnx_path), target)
    # Fixed seed: timing must not depend on global RNG state, and inputs are equal across candidates.
    x = np.random.default_rng(0).standard_normal((target.batch_size, *input_shape)).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    for _ in range(target.warmup):
        session.run(None, feed)
    times_ns = np.empty(target.repeats, dtype=np.int64)
    out = None
    for i in range(target.repeats):
        start = time.perf_counter_ns()
        out = session.run(None, feed)
        times_ns[i] = time.perf_counter_ns() - start
    ms = times_ns / 1e6
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std()),
        n=int(target.repeats),
        provider=session.get_providers()[0],
        intra_op_threads=int(session.get_session_options().intra_op_num_threads),
        input_shape=tuple(int(d) for d in x.shape),
        output_shape=tuple(int(d) for d in np.shape(out[0])) if out else (),
    )
