"""Compression done by training, in trials and sweeps (issue 13, items 2 and 3): `compression.qat_epochs`
(quantization-aware fine-tuning of int8 candidates) and `compression.distill` with the space's
`distill.temperature` / `distill.weight` knobs.

Checked where they act: the exported file (QAT changes the weights, not the graph: same nodes as the PTQ
file), the trial's metrics (ptq_val_accuracy beside the QAT file's val_accuracy), trials.csv and MLflow, the
teacher trained once and reused on resume, the model card, and the one-line refusals (exit 2, nothing made).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import (
    assert_trial_runs_match,
    hwnas,
    hwnas_export,
    kill_after_first_trial_then_resume,
    output_of,
)
from test_layer_precision import macro_space

from hwnas.evaluators.compression_options import CompressionSettings, from_config
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.search.experiment import _same_setting, flatten

# One int8 candidate of the macro space: two conv stages (their convolutions are what int8 quantizes).
INT8 = {
    "n_stages": 2,
    "stage1.depth": 1, "stage1.width": 16, "stage1.kernel": 3, "stage1.block": "conv",
    "stage2.depth": 1, "stage2.width": 16, "stage2.kernel": 3, "stage2.block": "conv",
    "prune_ratio": 0.0, "quant": "int8",
}


def _evaluator(**compression: Any) -> Any:
    from test_pipeline import make_evaluator

    return make_evaluator(space=macro_space(n_stages=[1, 2], stage_precision=True), epochs=2,
                          compression=CompressionSettings(**compression))


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _weights(path: Path) -> list[np.ndarray]:
    """The constant inputs of the file's nodes (names and node order differ between exports)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    return [inits[i] for n in graph.node for i in n.input if i in inits]


def _differ(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Same tensor shapes, different values: as multisets, so node order does not matter."""
    assert Counter(x.shape for x in a) == Counter(x.shape for x in b)
    return Counter((x.shape, x.tobytes()) for x in a) != Counter((x.shape, x.tobytes()) for x in b)


# ---- QAT in a trial ----


def test_qat_trial_keeps_the_graph_changes_the_weights_and_reports_both_accuracies(tmp_path: Path) -> None:
    ptq = _evaluator().evaluate(INT8, tmp_path / "ptq")
    qat = _evaluator(qat_epochs=2).evaluate(INT8, tmp_path / "qat")
    # Same trained network (same seed), so the PTQ file QAT started from is the plain trial's file: its
    # accuracy is exactly the PTQ trial's, recomputed.
    assert qat.metrics["ptq_val_accuracy"] == ptq.metrics["val_accuracy"]
    assert qat.metrics["float_val_accuracy"] == ptq.metrics["float_val_accuracy"]
    assert "ptq_val_accuracy" not in ptq.metrics and ptq.metrics["qat_s"] == 0.0
    assert qat.metrics["qat_s"] > 0
    # Same graph (QAT changes no node: latency is a PTQ file's), different int8 weights.
    assert _ops(Path(qat.artifact)) == _ops(Path(ptq.artifact)) and _ops(Path(qat.artifact))["DequantizeLinear"] > 0
    assert _differ(_weights(Path(ptq.artifact)), _weights(Path(qat.artifact)))
    # The file QAT left is the one scored; the PTQ file and QAT's float export are gone, the fp32 twin stays.
    assert sorted(p.name for p in (tmp_path / "qat").iterdir() if p.suffix == ".onnx") == ["model.onnx", "model_fp32.onnx"]
    assert qat.info["training"]["qat"] == {"epochs": 2, "lr": pytest.approx(1e-3)}
    assert qat.metrics["val_accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_qat_keeps_a_float_stage_float_and_skips_fp32_candidates(tmp_path: Path) -> None:
    evaluator = _evaluator(qat_epochs=1)
    mixed = evaluator.evaluate({**INT8, "stage1.precision": "fp32", "stage2.precision": "int8"}, tmp_path / "mixed")
    graph = onnx.load(mixed.artifact).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dq_out]
    assert quantized and all(name.startswith("/2/") for name in quantized), quantized  # stage 1 stayed float
    fp32 = evaluator.evaluate({**INT8, "quant": "fp32"}, tmp_path / "fp32")
    assert fp32.metrics["qat_s"] == 0.0 and "ptq_val_accuracy" not in fp32.metrics and "qat" not in fp32.info["training"]


def test_final_training_runs_qat_and_reports_ptq_on_both_splits(tmp_path: Path) -> None:
    final = _evaluator(qat_epochs=1).retrain(INT8, tmp_path / "final", epochs=1)
    for split in ("val", "test"):
        assert 0.0 <= final.metrics[f"ptq_{split}_accuracy"] <= 1.0
    assert final.metrics["qat_s"] > 0
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["model.onnx", "model_fp32.onnx"]


def _quantized_nodes(path: Path) -> Counter:
    """Conv / Gemm nodes whose weight comes from a DequantizeLinear (what int8 computes), by op type."""
    graph = onnx.load(str(path)).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return Counter(n.op_type for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dq_out)


def test_pin_first_last_false_quantizes_the_stem_and_the_classifier_too(tmp_path: Path) -> None:
    from hwnas.evaluators.qat import prepare_qat, qat_layers

    pinned = _evaluator().evaluate(INT8, tmp_path / "pinned")
    free = _evaluator(pin_first_last=False, qat_epochs=1).evaluate(INT8, tmp_path / "free")
    assert _quantized_nodes(Path(pinned.artifact)) == Counter({"Conv": 2})  # the two stage convs
    assert _quantized_nodes(Path(free.artifact)) == Counter({"Conv": 3, "Gemm": 1})  # + stem and classifier
    model = macro_space().build(INT8, (1, 12, 12), 4)
    assert len(qat_layers(prepare_qat(model, full_range=True, pin_first_last=False))) == 4
    assert len(qat_layers(prepare_qat(model, full_range=True))) == 2


# ---- distillation in a trial ----


def _teacher_file(path: Path, classes: int = 4, channels: int = 1) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, classes)).eval()
    export_onnx(net, torch.zeros(1, channels, 12, 12), path, opset=17)
    return path


def test_distillation_from_a_users_onnx_teacher_changes_training_and_is_recorded(tmp_path: Path) -> None:
    teacher = _teacher_file(tmp_path / "teacher.onnx")
    fp32 = {**INT8, "quant": "fp32"}
    plain = _evaluator().evaluate(fp32, tmp_path / "plain")
    taught = _evaluator(teacher=str(teacher), temperature=2.0, weight=0.9)
    assert taught.prepare_teacher(tmp_path / "teachers")["sha256"] == taught.teacher.sha256
    with_teacher = taught.evaluate(fp32, tmp_path / "taught")
    # Same seed, same data order: only the teacher's soft targets differ, so the weights do.
    assert _differ(_weights(Path(plain.artifact)), _weights(Path(with_teacher.artifact)))
    assert _ops(Path(plain.artifact)) == _ops(Path(with_teacher.artifact))  # the teacher changes no node
    assert with_teacher.info["training"]["distill"] == {"temperature": 2.0, "weight": 0.9,
                                                        "teacher_sha256": taught.teacher.sha256}
    # A candidate's searched values win over compression.distill's.
    assert taught.training_settings({**fp32, "distill.temperature": 8.0})["distill"]["temperature"] == 8.0
    # Weight 0 is distillation off: the teacher is not run at all (the same weights, as tests/test_distill.py shows).
    assert taught.distillation({**fp32, "distill.weight": 0.0}) is None
    assert taught.distillation({**fp32, "distill.weight": 0.5}).weight == 0.5


def test_a_teacher_that_does_not_fit_the_data_is_refused_before_training(tmp_path: Path) -> None:
    evaluator = _evaluator(teacher=str(_teacher_file(tmp_path / "t10.onnx", classes=10)))
    with pytest.raises(ValueError) as info:
        evaluator.prepare_teacher(tmp_path / "teachers")
    assert "\n" not in str(info.value) and "10" in str(info.value)


# ---- config: checked, and resumable from a run folder made before the block ----


@pytest.mark.parametrize(
    "node, message",
    [
        ({"qat_epochs": -1}, "compression.qat_epochs: -1 is not allowed; allowed: an int 0..10000"),
        ({"qat_epochs": True}, "compression.qat_epochs: True is not allowed"),
        ({"qat_lr_scale": 0}, "compression.qat_lr_scale: 0 is not allowed; allowed: a finite float > 0"),
        ({"distill": {"weight": 1.5}}, "compression.distill.weight: 1.5 is not allowed; allowed: a float 0 <= w <= 1"),
        ({"distill": {"temperature": 0}}, "compression.distill.temperature: 0 is not allowed"),
        ({"distill": {"teacher": "/no/such/teacher.onnx"}}, "compression.distill.teacher: '/no/such/teacher.onnx' is not a file"),
        ({"distill": {"teacher": ""}}, "compression.distill.teacher: '' is not allowed"),
        ({"distill": {"teacher_epochs": 0}}, "compression.distill.teacher_epochs: 0 is not allowed"),
        ({"distill": {"tmperature": 2}}, "compression.distill.tmperature: unknown key"),
        ({"qat": 1}, "compression.qat: unknown key; allowed: pin_first_last, qat_epochs, qat_lr_scale, distill"),
        ({"pin_first_last": "yes"}, "compression.pin_first_last: 'yes' is not allowed; allowed: true, false"),
    ],
)
def test_bad_compression_values_refused_in_one_line(node: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        from_config(node)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_run_folder_without_the_block_resumes_with_it_off() -> None:
    now = flatten({"compression": {"pin_first_last": True, "qat_epochs": 0, "qat_lr_scale": 0.1, "distill": {
        "teacher": None, "temperature": 4.0, "weight": 0.5, "teacher_epochs": 10, "teacher_candidate": None,
        "cache_dir": None}}})
    assert all(_same_setting({}, now, key) for key in now)
    assert not _same_setting({}, {**now, "compression.qat_epochs": 1}, "compression.qat_epochs")
    assert not _same_setting({}, {**now, "compression.distill.temperature": 2.0}, "compression.distill.temperature")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["space.distill={temperature:[2.0,4.0]}"],
         "space.distill: distill.* knobs are searched but compression.distill.teacher is null"),
        (["compression.qat_epochs=1", "space.quant=[fp32]"],
         "compression.qat_epochs: 1 but space.quant (fp32) has no int8 to train for"),
        (["compression.distill.weight=2"], "compression.distill.weight: 2 is not allowed"),
        (["space.distill={temperature:[0.0]}", "compression.distill.teacher=train"],
         "space.distill.temperature: 0.0 is not allowed; allowed: a finite float > 0"),
    ],
)
def test_bad_compression_config_refused_through_the_cli(tmp_path: Path, overrides: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    proc = hwnas("runner=local", "tracking.enabled=false", f"run_dir={run_dir}", *overrides, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, output_of(proc)
    assert len(lines) == 1 and lines[0].startswith(f"hwnas: error: {message}"), proc.stderr
    assert not run_dir.exists()


def test_a_teacher_file_that_does_not_fit_is_refused_through_the_cli(tmp_path: Path) -> None:
    teacher = _teacher_file(tmp_path / "t3.onnx", classes=3)
    run_dir = tmp_path / "run"
    proc = hwnas("experiment=smoke", "runner=local", "tracking.enabled=false", f"run_dir={run_dir}",
                 f"compression.distill.teacher={teacher}", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, output_of(proc)
    assert len(lines) == 1 and lines[0].startswith("hwnas: error: compression.distill.teacher"), proc.stderr
    assert not run_dir.exists()  # refused after the data was read: the folder it made is removed


# ---- every knob in one sweep, killed and resumed, then exported ----


def test_compress_all_sweep_records_qat_and_distillation_and_resumes(tmp_path: Path) -> None:
    """experiment=compress_all with int8 only: every trial runs QAT and learns from the one teacher; the
    knobs are columns of trials.csv and params of each MLflow child run; killed after its first trial and
    resumed, the teacher is reused (same file, not trained again) and the sweep finishes; hwnas-export then
    trains the teacher again in its own folder (a run folder's is not trusted) and the card records it."""
    n = 3
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["experiment=compress_all", "runner=local", f"n_trials={n}", f"run_dir={run_dir}", f"tracking.uri={uri}",
            f"hardware.cache={tmp_path / 'latency.sqlite'}", "space.quant=[int8]", "space.widths=[16]",
            "space.blocks=[conv]"]
    teachers = run_dir / "data" / "teachers"

    before, rows = kill_after_first_trial_then_resume(args, run_dir, n)
    made = list(teachers.glob("teacher-*.onnx"))
    assert len(made) == 1, made
    assert all(r["metrics"]["qat_s"] > 0 and 0 <= r["metrics"]["ptq_val_accuracy"] <= 1 for r in rows), rows
    # Trained before the first trial and not written again by the resume (which began after that trial ended).
    assert made[0].stat().st_mtime < before[0]["started_at"]

    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and (trials["status"] == "COMPLETE").all(), trials
    for column in ("distill.temperature", "distill.weight", "train.lr", "stage1.precision", "ptq_val_accuracy"):
        assert column in trials.columns, list(trials.columns)
    assert trials["distill.temperature"].isin([2.0, 4.0]).all()
    assert trials["distill.weight"].between(0.3, 0.9).all()
    assert_trial_runs_match(uri, "hwnas-compress_all", rows, params=["distill.temperature", "distill.weight"],
                            metrics=["ptq_val_accuracy"])

    shipped = hwnas_export(f"run_dir={run_dir}", timeout=300)  # the trial's file ships: no teacher is run
    assert shipped.returncode == 0 and "distillation teacher" not in shipped.stdout, output_of(shipped)
    export = hwnas_export(f"run_dir={run_dir}", "final.epochs=1", timeout=300)
    assert export.returncode == 0, output_of(export)
    assert "distillation teacher: training" in export.stdout  # trained again, privately
    import json

    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["training"]["distill"]["teacher_sha256"] and card["training"]["qat"]["epochs"] == 1
