"""Latency of an ONNX file on a named target; the protocol and targets live in evaluators/measure/.

Kept for conf/hardware/*.yaml and old run folders (`_target_: hwnas.evaluators.latency.LatencyTarget`)
and for scripts that call `measure_latency(path, target, input_shape)`.
"""

from __future__ import annotations

from pathlib import Path

from hwnas.evaluators.measure.base import MeasureError, Target
from hwnas.evaluators.measure.local import LocalTarget
from hwnas.evaluators.measure.protocol import PROVIDERS, Measurement

LatencyTarget = LocalTarget
LatencyStats = Measurement  # the old result type's name; median_ms, p90_ms, mean_ms, std_ms, n (= n_runs)

__all__ = ["PROVIDERS", "LatencyStats", "LatencyTarget", "LocalTarget", "MeasureError", "Measurement",
           "Target", "measure_latency"]


def measure_latency(onnx_path: str | Path, target: Target, input_shape: tuple[int, ...]) -> Measurement:
    """Time a file on `target`; `input_shape` (no batch dim) must be the model's, checked before timing."""
    target.check_available()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Reads the graph's declared input only (no optimisation pass): cheap next to the timing itself.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    declared = ort.InferenceSession(str(onnx_path), sess_options=options,
                                    providers=["CPUExecutionProvider"]).get_inputs()[0].shape[1:]
    if tuple(declared) != tuple(input_shape):
        raise ValueError(f"input_shape={tuple(input_shape)} is wrong for {Path(onnx_path).name}; "
                         f"allowed: the model's input {tuple(declared)}")
    return target.measure(onnx_path)
