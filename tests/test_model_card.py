"""The export a researcher deploys: every field of its model card checked against where it comes from,
the registered MLflow model loaded and run, final training, and a run folder moved before export.

A real sweep (local runner, int8 so the card has a float twin, MLflow in an SQLite file); the files the
card describes are opened with ONNX Runtime and onnx, nothing is mocked.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import hwnas, hwnas_export, output_of, read_jsonl
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.search.recorder import file_sha256
from hwnas.search.units import format_ms

OVERRIDES = ("experiment=smoke", "runner=local", "n_trials=3", "space.quant=[int8]", "evaluator.epochs=2")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("card")
    run_dir, uri = tmp / "run", f"sqlite:///{tmp}/mlflow.db"
    proc = hwnas(*OVERRIDES, f"run_dir={run_dir}", f"tracking.uri={uri}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    return run_dir, uri, proc


def _data(run_dir: Path):  # the run's data, read again from its config (fingerprint pinned)
    data = instantiate(OmegaConf.load(run_dir / "config.yaml").dataset)
    data.setup()
    return data


def _accuracy(path: Path, data, split: str) -> float:
    x, y = data.arrays(split)
    return onnx_accuracy(str(path), x, y)


def test_every_card_field_matches_its_source(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _, proc = sweep
    export = run_dir / "export"
    card = json.loads((export / "model_card.json").read_text())
    summary = json.loads((run_dir / "data.json").read_text())
    hardware = json.loads((run_dir / "hardware.json").read_text())
    (row,) = [r for r in read_jsonl(run_dir / "trials.jsonl") if r["number"] == card["candidate"]["trial"]]
    model = onnx.load_from_string((export / "model.onnx").read_bytes())
    meta = {p.key: p.value for p in model.metadata_props}

    # The candidate and its compression.
    assert card["candidate"]["params"] == row["candidate"] and card["candidate"]["arch_id"] == row["arch_id"]
    assert card["candidate"]["compression"] == {"prune_ratio": row["candidate"]["prune_ratio"], "quant": "int8",
                                                "computes": hardware["formats"]["int8"]}
    # Input and output: what the file itself declares.
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert card["input"]["name"] == inp.name and card["input"]["shape"][1:] == dims[1:] == summary["input_shape"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and card["input"]["dtype"] == "float32"
    assert card["input"]["layout"] == "NCHW" and card["input"]["channel_order"] == "grey"  # synthetic: one channel
    assert card["output"]["name"] == out.name and card["output"]["shape"][1] == len(summary["classes"])
    # Preprocessing and labels: the train split's statistics, also inside the ONNX file.
    norm = summary["normalization"]
    assert card["labels"] == summary["classes"] == json.loads(meta["hwnas.labels"])
    pre = card["preprocessing"]
    assert (pre["scale"], pre["mean"], pre["std"]) == (norm["scale"], norm["mean"], norm["std"])
    assert pre["resolution"] == summary["input_shape"][1:] and json.loads(meta["hwnas.preprocessing"]) == pre
    # Accuracy of the exported file and of its float twin, with ONNX Runtime.
    data = _data(run_dir)
    m = card["metrics"]
    assert m["val_accuracy"] == _accuracy(export / "model.onnx", data, "val") == row["metrics"]["val_accuracy"]
    assert m["test_accuracy"] == _accuracy(export / "model.onnx", data, "test")
    twin = run_dir / row["artifact"].replace("model.onnx", "model_fp32.onnx")
    assert m["float_val_accuracy"] == _accuracy(twin, data, "val") == row["metrics"]["float_val_accuracy"]
    assert m["float_test_accuracy"] == _accuracy(twin, data, "test")
    # Latency: the trial's figure and the export's own, with the device and protocol of hardware.json.
    lat = card["latency"]
    assert lat["trial"]["p50_ms"] == row["metrics"]["latency_ms"] and lat["trial"]["source"] == "measured"
    assert lat["export"]["source"] == "measured" and 0 < lat["export"]["p50_ms"] <= lat["export"]["p90_ms"]
    assert m["latency_ms"] == lat["export"]["p50_ms"] and m["latency_source"] == "export (measured)"
    assert lat["device_id"] == hardware["device_id"] == row["device_id"] and lat["protocol"] == hardware["protocol"]
    assert lat["protocol_key"] == hardware["protocol_key"] and card["device"] == hardware["fingerprint"]
    # Size, data, provenance.
    assert m["model_bytes"] == (export / "model.onnx").stat().st_size
    assert (m["params"], m["macs"]) == (row["metrics"]["params"], row["metrics"]["macs"])
    assert card["dataset"]["fingerprint"] == summary["fingerprint"] == meta["hwnas.data_fingerprint"]
    assert card["dataset"]["splits"] == summary["splits"]
    assert card["libraries"]["onnxruntime"] == onnxruntime.__version__ and card["seed"] == 0
    assert card["files"]["sha256"] == file_sha256(export / "model.onnx")
    assert card["files"]["measured_sha256"] == row["artifact_sha256"] == file_sha256(run_dir / row["artifact"])
    assert card["final_training"] == {"ran": False}
    assert card["training"]["epochs"] == 2 and card["training"]["optimizer"] == "adam"  # evaluator.epochs=2, the default optimizer
    assert card["registered_model"]["name"] == "hwnas-smoke" and card["registered_model"]["version"] == "1"
    sweep_cmd = shlex.split(card["reproduce"]["sweep"])
    assert sweep_cmd[0] == "hwnas" and set(OVERRIDES) <= set(sweep_cmd) and "run_dir=NEW_FOLDER" in sweep_cmd
    assert card["reproduce"]["export"] == f"hwnas-export run_dir={run_dir}"
    # The Markdown page says the same things a person needs.
    md = (export / "MODEL_CARD.md").read_text()
    for text in (*card["labels"], "float twin", format_ms(lat["export"]["p50_ms"]), format_ms(lat["trial"]["p50_ms"]),
                 hardware["device_id"], hardware["protocol_key"], card["files"]["sha256"], card["reproduce"]["sweep"],
                 f"{100 * m['test_accuracy']:.2f}%", f"{100 * m['float_test_accuracy']:.2f}%", "Final training did not run"):
        assert text in md, text
    # The report the sweep wrote at the end marks the exported trial as the chosen one.
    assert f"trial {card['candidate']['trial']}</dd>" in (run_dir / "report.html").read_text()
    # The closing summary points at all of it, with a link that opens MLflow's runs table.
    assert f"exported trial {card['candidate']['trial']}" in proc.stdout and "report.html" in proc.stdout
    assert "workflowType=machine_learning" in proc.stdout and "registered models:/hwnas-smoke/1" in proc.stdout


def test_the_registered_model_loads_and_predicts(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    import mlflow

    run_dir, uri, _ = sweep
    x, _ = _data(run_dir).arrays("val")
    batch = x[:8]
    expected = onnxruntime.InferenceSession(str(run_dir / "export" / "model.onnx")).run(None, {"input": batch})[0]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        scores = mlflow.pyfunc.load_model("models:/hwnas-smoke/latest").predict(batch)["logits"]
        as_onnx = mlflow.onnx.load_model("models:/hwnas-smoke/1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert scores.shape == (8, 4) and np.array_equal(scores, expected)
    assert {p.key for p in as_onnx.metadata_props} >= {"hwnas.labels", "hwnas.preprocessing"}


def test_a_moved_run_folder_exports_with_final_training(
    sweep: tuple[Path, str, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    run_dir, _, _ = sweep
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, tmp_path / "copy")
    moved.parent.mkdir()
    shutil.move(tmp_path / "copy", moved)  # a folder handed over: no path in it points where it was made
    proc = hwnas_export(f"run_dir={moved}", "final.epochs=2", "tracking.enabled=false", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    assert "final training" in proc.stdout and "retrained 2 epochs on train+val" in proc.stdout
    card = json.loads((moved / "export" / "model_card.json").read_text())
    (row,) = [r for r in read_jsonl(moved / "trials.jsonl") if r["number"] == card["candidate"]["trial"]]
    final = card["final_training"]
    assert final["ran"] is True and final["epochs"] == 2 and final["trained_on"] == "train+val"
    data = _data(moved)
    assert card["metrics"]["test_accuracy"] == _accuracy(moved / "export" / "model.onnx", data, "test")
    assert card["files"]["sha256"] != row["artifact_sha256"]  # a new file: retrained, compressed again, measured again
    assert card["latency"]["export"]["source"] == "measured" and "final.epochs=2" in card["reproduce"]["export"].split()
    assert "Final training ran: 2 epochs" in (moved / "export" / "MODEL_CARD.md").read_text()
    assert not any(p.name.startswith(".export") for p in moved.iterdir())
    report = hwnas(f"run_dir={moved}", entry="hwnas-report")
    assert report.returncode == 0, report.stderr
    assert "Final training ran" in (moved / "report.html").read_text()


@pytest.mark.parametrize("value", ["0", "abc", "2.5", "100000"])
def test_a_bad_final_epochs_is_one_line(sweep: tuple[Path, str, subprocess.CompletedProcess[str]], value: str) -> None:
    run_dir, _, _ = sweep
    before = (run_dir / "export" / "model_card.json").read_bytes()
    proc = hwnas_export(f"run_dir={run_dir}", f"final.epochs={value}", "tracking.enabled=false")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, output_of(proc)
    assert lines[0].startswith("hwnas-export: error: final.epochs:") and "allowed: an integer 1..10000" in lines[0]
    assert (run_dir / "export" / "model_card.json").read_bytes() == before  # refused before any work
