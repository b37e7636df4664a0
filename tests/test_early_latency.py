"""Latency-first and rung reports in the pipeline (issue 14): the untrained file made before training has the
trained file's graph (so its latency is the trained file's), a reporter can end a trial before training or at a
rung, and a trial that survives every rung trains exactly as one without a scheduler."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import pytest
from test_layer_precision import macro_space
from test_pipeline import make_evaluator

from hwnas.evaluators.base import TrialStopped
from hwnas.evaluators.compression_options import CompressionSettings
from hwnas.evaluators.graph_signature import graph_signature
from hwnas.evaluators.measure.cache import file_sha256

# Two conv stages, half the channels pruned, int8, the second stage factorized: every knob that shapes the graph.
CANDIDATE = {
    "n_stages": 2,
    "stage1.depth": 1, "stage1.width": 16, "stage1.kernel": 3, "stage1.block": "conv",
    "stage2.depth": 2, "stage2.width": 24, "stage2.kernel": 3, "stage2.block": "ir3",
    "stage1.rank_ratio": 1.0, "stage2.rank_ratio": 0.5,
    "prune_ratio": 0.5, "quant": "int8",
}


class Recording:
    """A reporter that answers from a script and keeps what it was told (and a copy of the untrained file)."""

    def __init__(self, rungs: tuple[int, ...], stop_at: int | None, trial_dir: Path, keep: Path) -> None:
        self.rungs = rungs
        self.stop_at = stop_at
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.trial_dir, self.keep = trial_dir, keep

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self.calls.append((epoch, dict(metrics)))
        if epoch == 0:
            shutil.copyfile(self.trial_dir / "model_early.onnx", self.keep)
        return epoch != self.stop_at


def _evaluator(**compression: Any) -> Any:
    return make_evaluator(space=macro_space(n_stages=[1, 2], rank_ratios=[1.0, 0.5]), epochs=3, finetune_epochs=1,
                          compression=CompressionSettings(**compression))


def _run(tmp_path: Path, name: str, rungs: tuple[int, ...], stop_at: int | None, **compression: Any) -> tuple[Any, Recording]:
    trial_dir = tmp_path / name
    reporter = Recording(rungs, stop_at, trial_dir, tmp_path / f"{name}-early.onnx")
    result = _evaluator(**compression).evaluate(dict(CANDIDATE), trial_dir, report=reporter)
    return result, reporter


def test_early_file_has_the_trained_files_graph_so_its_latency_is_the_final_one(tmp_path: Path) -> None:
    result, reporter = _run(tmp_path, "t", rungs=(1, 2), stop_at=None)
    assert [epoch for epoch, _ in reporter.calls] == [0, 1, 2]
    early = tmp_path / "t-early.onnx"
    final = Path(result.artifact)
    # Different weights (trained, pruned by trained magnitudes), the same graph: same kernels, same shapes.
    assert file_sha256(early) != file_sha256(final)
    assert graph_signature(early) == graph_signature(final)
    assert result.metrics["latency_early"] == 1.0
    assert result.metrics["latency_ms"] == reporter.calls[0][1]["latency_ms"]
    # The same tensors; only the exporter's tensor names (their numbering) can differ by a few bytes.
    assert result.metrics["model_bytes"] == pytest.approx(reporter.calls[0][1]["model_bytes"], abs=64)
    assert result.metrics["params"] == reporter.calls[0][1]["params"]
    assert result.metrics["early_s"] > 0 and result.metrics["train_epochs"] == 3
    assert not (final.parent / "model_early.onnx").exists()  # measured, then removed: the trial ships one file
    for _, metrics in reporter.calls[1:]:
        assert 0.0 <= metrics["rung_val_accuracy"] <= 1.0 and metrics["train_epochs_full"] == 3


def test_a_trial_that_survives_every_rung_trains_exactly_as_one_without_a_scheduler(tmp_path: Path) -> None:
    scheduled, _ = _run(tmp_path, "s", rungs=(1, 2), stop_at=None)
    plain = _evaluator().evaluate(dict(CANDIDATE), tmp_path / "plain")
    # The rung's accuracy runs on a copy with the RNG state kept: the same batches, the same weights.
    assert scheduled.metrics["torch_val_accuracy"] == plain.metrics["torch_val_accuracy"]
    assert scheduled.metrics["val_accuracy"] == plain.metrics["val_accuracy"]
    assert graph_signature(scheduled.artifact) == graph_signature(plain.artifact)


def test_rejected_before_training_trains_nothing(tmp_path: Path) -> None:
    with pytest.raises(TrialStopped) as stopped:
        _run(tmp_path, "r", rungs=(1,), stop_at=0)
    assert stopped.value.epoch == 0
    assert not (tmp_path / "r" / "model.onnx").exists()
    assert (tmp_path / "r" / "model_early.onnx").is_file()  # what was measured stays with the trial


def test_stopped_at_a_rung(tmp_path: Path) -> None:
    with pytest.raises(TrialStopped) as stopped:
        _run(tmp_path, "k", rungs=(1, 2), stop_at=1)
    assert stopped.value.epoch == 1
    assert not (tmp_path / "k" / "model.onnx").exists()


def test_qat_keeps_the_graph_too(tmp_path: Path) -> None:
    # QAT fine-tunes with BatchNorm folded; the exporter folds it in the other files as well: one graph.
    result, reporter = _run(tmp_path, "q", rungs=(), stop_at=None, qat_epochs=1)
    assert graph_signature(tmp_path / "q-early.onnx") == graph_signature(result.artifact)
    assert result.metrics["latency_early"] == 1.0 and [e for e, _ in reporter.calls] == [0]


class GraphChanging(Recording):
    """No shipped choice changes the graph with training (the tests above); a plug-in space's might (a layer
    count chosen from the weights). Simulated here: the untrained file is given one more node after it was timed."""

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        keep = super().__call__(epoch, metrics)
        if epoch == 0:
            path = self.trial_dir / "model_early.onnx"
            model = onnx.load(str(path))
            out = model.graph.output[0].name
            model.graph.node.append(onnx.helper.make_node("Identity", [out], [out + "_copy"]))
            model.graph.output[0].name = out + "_copy"
            onnx.save(model, str(path))
        return keep


def test_a_graph_that_changes_with_training_is_measured_again_and_the_gap_reported(tmp_path: Path) -> None:
    trial_dir = tmp_path / "g"
    reporter = GraphChanging((), None, trial_dir, tmp_path / "g-early.onnx")
    result = _evaluator().evaluate(dict(CANDIDATE), trial_dir, report=reporter)
    assert result.metrics["latency_early"] == 0.0  # the early figure was an estimate: labelled, and measured again
    early_ms = reporter.calls[0][1]["latency_ms"]
    assert result.metrics["latency_early_ms"] == early_ms
    expected_gap = 100.0 * (early_ms - result.metrics["latency_ms"]) / result.metrics["latency_ms"]
    assert result.metrics["latency_early_gap_pct"] == pytest.approx(expected_gap)
    assert result.metrics["latency_ms"] != early_ms  # its own measurement (two timings never agree to the bit)
