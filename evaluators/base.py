"""The contract between the search (driver) and whatever turns a candidate into numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass
class Evaluation:
    """Measured numbers of one candidate.

    metrics: flat name -> float. Names that cross boundaries: val_accuracy (0..1, of the exported
    file, computed with ONNX Runtime), float_val_accuracy (the same of its fp32 twin, before
    compression), latency_ms (median), latency_p90_ms, model_bytes, params, macs, and `<step>_s` for
    the seconds each step took.
    artifact: path of the exact file whose accuracy and latency were measured (None for tables).
    """

    metrics: dict[str, float]
    artifact: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Evaluator(Protocol):
    def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Evaluation:
        """Evaluate one candidate; write any files under trial_dir. Raise on failure.

        deadline: a time.monotonic() value (the trial's time limit); past it, raise TimeoutError.
        """
