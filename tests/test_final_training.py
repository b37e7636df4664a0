"""Final training and the export's re-measurement (issue 12): `PipelineEvaluator.retrain` fits a candidate
from scratch on train + val ("trainval") with the sweep's seed and compression, `measure_fresh` times
a file past the latency cache; a trial keeps its fp32 twin and reports `float_val_accuracy`.

Real components throughout: Lightning training, ONNX export and quantization, ONNX Runtime accuracy,
the latency protocol on this CPU and an SQLite latency cache.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import make_evaluator

from hwnas.evaluators.base import Evaluation
from hwnas.evaluators.data import LightningData, SyntheticData
from hwnas.evaluators.latency import LatencyTarget
from hwnas.evaluators.measure.cache import LatencyCache, file_sha256
from hwnas.evaluators.measure.fingerprint import fingerprint_id
from hwnas.evaluators.measure.plan import LATENCY_FILE, LatencyPlan
from hwnas.evaluators.pipeline import RETRAIN_METRIC_NAMES, PipelineEvaluator
from hwnas.evaluators.train import fit

EPOCHS = 2
CASES = {  # fp32, int8, and pruned (fine-tuned on trainval too) + int8
    "fp32": {"width": 16, "block": "separable", "prune_ratio": 0.0, "quant": "fp32"},
    "int8": {"width": 16, "block": "separable", "prune_ratio": 0.0, "quant": "int8"},
    "pruned-int8": {"width": 16, "block": "separable", "prune_ratio": 0.5, "quant": "int8"},
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluator() -> PipelineEvaluator:
    return pickle.loads(pickle.dumps(make_evaluator()))  # as the export ships it


@pytest.fixture(scope="module")
def retrained(evaluator: PipelineEvaluator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Evaluation, Path]]:
    out = {}
    for name, candidate in CASES.items():
        folder = tmp_path_factory.mktemp(name) / "final"  # not there yet: retrain makes it
        out[name] = (evaluator.retrain(candidate, folder, EPOCHS), folder)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_retrain_writes_the_model_and_its_twin_and_scores_both(evaluator, retrained, name: str) -> None:
    ev, folder = retrained[name]
    compressed = CASES[name]["quant"] != "fp32"
    assert Path(ev.artifact) == folder / "model.onnx"
    # No latency here: measure_fresh times the file; no latency.json is written.
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", *(["model_fp32.onnx"] if compressed else [])]
    m = ev.metrics
    # init_* only with evaluator.init_from (not set here); lowrank_layers only with the space's rank knob on
    assert set(m) == RETRAIN_METRIC_NAMES - {"init_loaded_tensors", "init_skipped_tensors", "lowrank_layers",
                                            "ptq_val_accuracy", "ptq_test_accuracy"}  # ptq_*: QAT only
    assert all(isinstance(v, float) for v in m.values())
    for key in ("test_accuracy", "float_test_accuracy", "val_accuracy", "float_val_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert m["test_accuracy"] > 0.8  # 4 learnable classes: chance is 0.25
    # The figures are those of the files, recomputed by the function the export uses.
    assert m["test_accuracy"] == evaluator.evaluate_file(folder / "model.onnx", "test")
    assert m["val_accuracy"] == evaluator.evaluate_file(folder / "model.onnx", "val")
    if compressed:
        assert m["float_test_accuracy"] == evaluator.evaluate_file(folder / "model_fp32.onnx", "test")
        assert m["float_val_accuracy"] == evaluator.evaluate_file(folder / "model_fp32.onnx", "val")
        assert ev.info["float_artifact"] == str(folder / "model_fp32.onnx")
    else:
        assert (m["float_test_accuracy"], m["float_val_accuracy"]) == (m["test_accuracy"], m["val_accuracy"])
        assert ev.info["float_artifact"] is None
    assert m["model_bytes"] == (folder / "model.onnx").stat().st_size
    assert m["train_s"] > 0 and m["compress_s"] >= 0 and m["total_s"] >= m["train_s"]
    assert (m["prune_s"] > 0) == (CASES[name]["prune_ratio"] > 0)
    sizes = evaluator.data.summary()["splits"]
    assert ev.info["split"] == "trainval" and ev.info["train_items"] == sizes["train"] + sizes["val"]
    assert ev.info["seed"] == evaluator.trial_seed(CASES[name]) and ev.info["epochs"] == EPOCHS


def test_pruning_shrinks_the_retrained_model(retrained) -> None:
    full, pruned = retrained["int8"][0].metrics, retrained["pruned-int8"][0].metrics
    assert pruned["params"] < 0.6 * full["params"] and pruned["model_bytes"] < full["model_bytes"]


def test_the_same_seed_gives_the_same_bytes(evaluator, retrained, tmp_path: Path) -> None:
    ev, folder = retrained["pruned-int8"]
    again = evaluator.retrain(CASES["pruned-int8"], tmp_path / "again", EPOCHS)
    assert sha(Path(again.artifact)) == sha(folder / "model.onnx")
    assert sha(tmp_path / "again" / "model_fp32.onnx") == sha(folder / "model_fp32.onnx")
    assert again.metrics["test_accuracy"] == ev.metrics["test_accuracy"]


def test_retrain_trains_on_train_and_val_not_train_alone(evaluator, retrained, tmp_path: Path) -> None:
    # The sweep's training (train only, the same seed and epochs) gives another network than final training.
    trial = make_evaluator(epochs=EPOCHS).evaluate(CASES["fp32"], tmp_path / "trial")
    assert sha(Path(trial.artifact)) != sha(retrained["fp32"][1] / "model.onnx")


def test_retrain_refuses_bad_epochs(evaluator, tmp_path: Path) -> None:
    for epochs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="epochs: .*allowed: an int >= 1"):
            evaluator.retrain(CASES["fp32"], tmp_path, epochs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


# ---- the trainval pseudo-split ----


def _synthetic(**overrides) -> SyntheticData:
    kwargs = dict(n_samples=200, num_classes=4, resolution=12, channels=1, val_fraction=0.25, test_fraction=0.25,
                  batch_size=32, seed=0, noise=0.3)
    return SyntheticData(**{**kwargs, **overrides})


def test_trainval_is_train_and_val_together() -> None:
    data = _synthetic()
    (xt, yt), (xv, yv), (xa, ya) = data.arrays("train"), data.arrays("val"), data.arrays("trainval")
    assert len(ya) == len(yt) + len(yv) == 150
    # The same items: every train and val row is in trainval once, and no test row is.
    rows = {row.tobytes() for row in xa}
    assert len(rows) == len(xa) and rows == {row.tobytes() for row in np.concatenate([xt, xv])}
    assert not rows & {row.tobytes() for row in data.arrays("test")[0]}
    assert sorted(ya.tolist()) == sorted(np.concatenate([yt, yv]).tolist())
    assert data.sample("trainval", 10, seed=1).shape == (10, 1, 12, 12)
    assert data.sample("trainval", 1000, seed=1).shape == (150, 1, 12, 12)  # all when it has fewer
    assert sum(len(y) for _, y in data.loader("trainval", shuffle=True, seed=0)) == 150
    with pytest.raises(ValueError, match="allowed: train, val, test, trainval"):
        data.arrays("everything")


def test_trainval_is_augmented_like_train_when_shuffled() -> None:
    data = _synthetic(augment=True, crop_padding=2)
    x, _ = data.arrays("trainval")
    rows = {row.tobytes() for row in x}
    for split in ("train", "trainval"):
        augmented = np.concatenate([b.numpy() for b, _ in data.loader(split, shuffle=True, seed=0)])
        assert sum(row.tobytes() not in rows for row in augmented) > len(augmented) // 2, split
    plain = np.concatenate([b.numpy() for b, _ in data.loader("trainval", shuffle=False)])
    assert np.array_equal(plain, x)  # unshuffled reads are never augmented


def test_trainval_of_a_lightning_datamodule(tmp_path: Path) -> None:
    data = LightningData(module={"_target_": "own_datamodule.OwnDataModule", "seed": 3},
                         val_fraction=0.2, test_fraction=0.2, batch_size=32, seed=0)
    summary = data.prepare(tmp_path / "cache")
    assert len(data.arrays("trainval")[1]) == summary["splits"]["train"] + summary["splits"]["val"] == 180


def test_fit_takes_the_split_and_refuses_an_evaluation_split() -> None:
    from torch import nn

    data = _synthetic()
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    fit(model, data, epochs=1, lr=1e-2, optimizer="adam", weight_decay=0.0, accelerator="cpu", seed=0,
        compute_slot=False, split="trainval")
    with pytest.raises(ValueError, match="split='test' is not a training split; allowed: train, trainval"):
        fit(model, data, epochs=1, lr=1e-2, optimizer="adam", weight_decay=0.0, accelerator="cpu", seed=0,
            split="test")


# ---- a trial's fp32 twin ----


def test_a_compressed_trial_keeps_its_twin_and_reports_its_accuracy(evaluator, tmp_path: Path) -> None:
    ev = evaluator.evaluate(CASES["int8"], tmp_path)
    assert "float_val_accuracy" in evaluator.metric_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json", "model.onnx", "model_fp32.onnx"]
    assert ev.metrics["float_val_accuracy"] == evaluator.evaluate_file(tmp_path / "model_fp32.onnx", "val")
    assert ev.metrics["val_accuracy"] == evaluator.evaluate_file(tmp_path / "model.onnx", "val")


# ---- the export's fresh latency ----


def test_measure_fresh_times_the_file_past_the_cache(retrained, tmp_path: Path) -> None:
    target = LatencyTarget(name="cpu-test", provider="cpu", threads=1, batch_size=1, warmup=2, repeats=5, block_ms=0.5)
    cache_path = tmp_path / "latency.sqlite"
    evaluator = make_evaluator(latency=LatencyPlan(target, cache=str(cache_path)))
    path = retrained["int8"][1] / "model.onnx"
    # Prime the cache with this very file, as its trial would have.
    first, how = evaluator.latency.measure(path, arch="a", candidate=CASES["int8"], space="TinySpace")
    assert first.source == "measured" and how["latency_cached"] == 0.0
    again, how = evaluator.latency.measure(path, arch="a", candidate=CASES["int8"], space="TinySpace")
    assert again.source == "cache" and how["latency_cached"] == 1.0 and again.median_ms == first.median_ms
    (path.parent / LATENCY_FILE).unlink()  # what the priming wrote next to the file

    fresh = evaluator.measure_fresh(path)
    assert fresh["source"] == "measured" and fresh["median_ms"] > 0 and fresh["n_runs"] > 0
    assert fresh["p90_ms"] >= fresh["median_ms"] and fresh["device_id"] == fingerprint_id(target.fingerprint())
    assert fresh["protocol"] == target.protocol().to_dict() and "disturbed" in fresh and "cv" in fresh
    assert "prediction_error" not in fresh
    # The cache still holds the sweep's own figure, and nothing was written next to the file.
    cached = LatencyCache(str(cache_path)).get(file_sha256(path), fresh["device_id"], target.protocol().key())
    assert cached is not None and cached.median_ms == first.median_ms
    assert not (path.parent / LATENCY_FILE).exists()
    # Where the caller asks, the record is written there.
    record = tmp_path / "export_latency.json"
    evaluator.measure_fresh(path, latency_file=record)
    assert '"measurement"' in record.read_text()


def test_measure_fresh_of_a_predict_only_plan_is_the_prediction_with_its_error(retrained, tmp_path: Path) -> None:
    """No device to time on: the predictor's figure, marked predicted, with its error; the host timing
    it needs is taken now too, and the cache is not written."""
    import torch
    from test_pipeline import TinySpace

    from hwnas.evaluators.measure.features import feature_row, onnx_features
    from hwnas.evaluators.measure.predictor import LatencyPredictor
    from hwnas.evaluators.measure.predictor_cli import host_target
    from hwnas.evaluators.onnx_export import export_onnx

    host = host_target("fast")
    rows, device_ms = [], []
    for i, (width, block) in enumerate([(w, b) for w in (4, 8, 16) for b in ("plain", "separable")]):
        net = TinySpace().build({"width": width, "block": block}, (1, 12, 12), 4).eval()
        path = export_onnx(net, torch.zeros(1, 1, 12, 12), tmp_path / f"{i}.onnx", opset=17)
        host_ms = host.measure(path).median_ms
        rows.append(feature_row(onnx_features(path), host_ms))
        device_ms.append(3.0 * host_ms + 0.01)  # a made-up device: no second one exists here
    predictor = LatencyPredictor.fit(rows, device_ms, device_id="synthetic-device", space="tiny",
                                     context={"host_protocol": "fast"}).save(tmp_path / "device.json")
    cache_path = tmp_path / "latency.sqlite"
    plan = LatencyPlan(LatencyTarget(name="cpu-test", provider="cpu"), predictor=str(predictor), cache=str(cache_path))
    assert not plan.uses_device
    path = retrained["fp32"][1] / "model.onnx"
    fresh = make_evaluator(latency=plan).measure_fresh(path)
    assert fresh["source"] == "predicted" and fresh["device_id"] == "synthetic-device" and fresh["median_ms"] > 0
    error = fresh["prediction_error"]
    assert set(error) == {"low_ms", "high_ms", "mape", "within10", "spearman", "n_fit", "outside_range"}
    assert error["low_ms"] <= fresh["median_ms"] <= error["high_ms"] and error["n_fit"] == 6
    assert not cache_path.exists() or LatencyCache(str(cache_path)).get(
        file_sha256(path), fingerprint_id(host.fingerprint()), host.protocol().key()) is None
    assert not (path.parent / LATENCY_FILE).exists()
