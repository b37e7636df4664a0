"""The contract between the search (driver) and whatever turns a candidate into numbers."""

from __future__ import annotations

from collections.abc import Mapping
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


class TrialStopped(Exception):
    """The sweep's scheduler stopped the trial after `epoch` training epochs (0: rejected before training,
    over a latency budget). The driver recorded it when it decided: this is not a failure."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped by the scheduler after {epoch} epochs" if epoch else "rejected before training")
        self.epoch = epoch


@runtime_checkable
class Reporter(Protocol):
    """How a training evaluator tells the sweep's scheduler (search/schedulers/) how a trial is doing.

    `report(0, metrics)`: before training, what the candidate's compressed file measures untrained (latency_ms,
    model_bytes, params, macs: they do not depend on the weights); `report(epoch, metrics)` after each epoch in
    `rungs`, with `rung_val_accuracy` besides. False: stop now (raise TrialStopped)."""

    rungs: tuple[int, ...]

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> bool: ...


@runtime_checkable
class Evaluator(Protocol):
    def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Evaluation:
        """Evaluate one candidate; write any files under trial_dir. Raise on failure.

        deadline: a time.monotonic() value (the trial's time limit); past it, raise TimeoutError.
        An evaluator that trains may also take `report: Reporter | None` (keyword) and set
        `reports_epochs = True`: the runners then pass the sweep's reporter, and it raises TrialStopped
        when told to stop.
        """
