"""A real sweep: Hydra -> Ray Tune + Optuna -> Lightning -> pruning + quantization -> ONNX Runtime -> MLflow.

Nothing is mocked: Ray starts a local instance, trials train with Lightning in Ray workers, every
metric comes from ONNX Runtime sessions, and MLflow writes a real SQLite store in tmp_path.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import copy_run, export_runs, hwnas, hwnas_export, mlflow_runs, output_of, read_jsonl
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.search.pareto import non_dominated_mask
from hwnas.search.recorder import file_sha256
from hwnas.search.sweep_state import journal_storage

N_SMOKE = 6


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir, uri = tmp / "run", f"sqlite:///{tmp}/mlflow.db"
    proc = hwnas(
        "experiment=smoke", "runner=ray", "runner.max_concurrent=2", f"n_trials={N_SMOKE}", "search=tpe",
        f"run_dir={run_dir}", f"tracking.uri={uri}", timeout=900,
    )
    assert proc.returncode == 0, output_of(proc)
    return run_dir, uri, proc


def test_six_trials_recorded_everywhere(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    run_dir, uri, proc = sweep
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == N_SMOKE and trials["number"].is_unique
    # Every candidate of the smoke space (1-2 stages, widths 8/16, fp32/int8) fits its 16x16
    # input and trains: no trial may fail here, for any reason.
    assert (trials["status"] == "COMPLETE").all(), trials[["number", "status", "error"]]
    assert trials["error"].isna().all()
    for col in ("val_accuracy", "latency_ms", "latency_p90_ms", "model_bytes", "params", "macs", "time/train_s"):
        assert trials[col].notna().all(), col
    assert (trials["latency_ms"] > 0).all() and (trials["latency_ms"] <= trials["latency_p90_ms"]).all()
    assert f"{N_SMOKE}/{N_SMOKE} done" in proc.stdout  # the progress line was shown, up to the end

    client = MlflowClient(tracking_uri=uri)
    parents, children = mlflow_runs(uri, "hwnas-smoke")
    assert len(parents) == 1 and len(children) == N_SMOKE
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(r.info.status == "FINISHED" for r in [*parents, *children])  # none FAILED, none left RUNNING
    assert sorted(int(c.data.tags["trial"]) for c in children) == sorted(trials["number"])
    for c in children:
        assert c.data.tags["pareto"] in ("true", "false")
        assert {"val_accuracy", "latency_ms", "model_bytes"} <= set(c.data.metrics)
        # Only metrics are metrics: the sampled parameters (Tune's config/*) are params, not metrics.
        assert not [k for k in c.data.metrics if k.startswith("config")], sorted(c.data.metrics)
        assert any(a.path.endswith(".onnx") for a in client.list_artifacts(c.info.run_id))
    assert sum(c.data.tags["pareto"] == "true" for c in children) == int(trials["pareto"].sum())
    # trials.csv: trial order, the objectives right after the trial's identity, integer params as integers.
    assert list(trials["number"]) == sorted(trials["number"])
    assert list(trials.columns[:8]) == ["number", "status", "arch_id", "net_id", "feasible", "pareto", "val_accuracy", "latency_ms"]
    assert not [c for c in trials.columns if c.startswith("config")]
    assert trials["n_stages"].dtype.kind == "i" and (trials["n_stages"] >= 1).all()
    # Step times are times, counts are integers, the file is named relative to the run folder.
    assert "time/train_s" in trials.columns and "train_s" not in trials.columns
    assert all(c.startswith("time/") for c in trials.columns[list(trials.columns).index("time/train_s"):]
               if c not in ("device_id", "latency_protocol", "node", "error", "artifact"))
    assert trials["model_bytes"].dtype.kind == "i" and trials["params"].dtype.kind == "i"
    assert trials["artifact"].str.startswith("trials/").all()
    for c in children:
        assert "time/train_s" in c.data.metrics and "train_s" not in c.data.metrics
        # The data as an MLflow dataset input (the runs table's Dataset column), digest = its fingerprint.
        (d,) = [i.dataset for i in c.inputs.dataset_inputs]
        assert d.digest == parents[0].data.tags["data_fingerprint"]
    study = optuna.load_study(study_name=None, storage=journal_storage(run_dir))
    assert study.metric_names == ["val_accuracy", "latency_ms"]  # optuna-dashboard names the objectives
    # Each Optuna trial says which MLflow run, device and data it belongs to.
    runs_by_number = {int(c.data.tags["trial"]): c.info.run_id for c in children}
    evaluated = [t for t in study.trials if "mlflow_run_id" in t.user_attrs]
    assert len(evaluated) == N_SMOKE
    for t in evaluated:  # the broker's trial number is Optuna's
        row = trials[trials["number"] == t.number].iloc[0]
        assert runs_by_number[t.number] == t.user_attrs["mlflow_run_id"] and t.user_attrs["arch_id"] == row["arch_id"]
        assert t.user_attrs["device_id"] == row["device_id"] and t.user_attrs["data_fingerprint"]
    # The export: a run of its own under the sweep, its logged model registered.
    (export,) = export_runs(uri, "hwnas-smoke")
    assert export.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and export.info.status == "FINISHED"
    assert [o.model_id for o in export.outputs.model_outputs]


def test_pareto_csv_is_non_dominated(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _, _ = sweep
    front = pd.read_csv(run_dir / "pareto.csv")
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(front) >= 1
    points = front[["val_accuracy", "latency_ms"]].to_numpy()
    assert non_dominated_mask(points, ["max", "min"]).all()
    # and no complete trial dominates a front member
    everything = trials[trials["status"] == "COMPLETE"][["val_accuracy", "latency_ms"]].to_numpy()
    for p in points:
        dominated = (everything[:, 0] >= p[0]) & (everything[:, 1] <= p[1]) & (
            (everything[:, 0] > p[0]) | (everything[:, 1] < p[1])
        )
        assert not dominated.any()
    assert (run_dir / "pareto.png").stat().st_size > 5000


def test_exported_model_reproduces_its_card(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    run_dir, uri, _ = sweep
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    model = run_dir / "export" / "model.onnx"
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = instantiate(cfg.dataset)
    data.setup()
    x, y = data.arrays("val")
    m = card["metrics"]
    assert onnx_accuracy(str(model), x, y) == m["val_accuracy"]
    x_test, y_test = data.arrays("test")
    assert onnx_accuracy(str(model), x_test, y_test) == m["test_accuracy"]
    assert 0.0 <= m["test_accuracy"] <= 1.0
    for key in ("candidate", "input", "output", "preprocessing", "labels", "latency", "device", "dataset", "libraries",
                "seed", "files", "reproduce", "final_training"):
        assert key in card, key
    assert m["model_bytes"] == model.stat().st_size and m["latency_ms"] > 0 and card["latency"]["export"]["source"] == "measured"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'hwnas-smoke'")
    assert len(versions) == 1


def test_reexport_with_a_budget_without_retraining(sweep: tuple[Path, str, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    run_dir, uri, _ = sweep
    trials = pd.read_csv(run_dir / "trials.csv")
    complete = trials[trials["status"] == "COMPLETE"]
    budget = float(np.median(complete["latency_ms"]))
    proc = hwnas_export(f"run_dir={run_dir}", f"objective.latency_budget_ms={budget}", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["latency"]["trial"]["p50_ms"] <= budget  # chosen on the trial's figure; the export's is measured again
    feasible = complete[complete["latency_ms"] <= budget]
    assert card["metrics"]["val_accuracy"] == feasible["val_accuracy"].max()
    # no trial was added or retrained
    assert len(pd.read_csv(run_dir / "trials.csv")) == len(trials)
    assert len((run_dir / "trials.jsonl").read_text().splitlines()) == len(trials)
    _assert_export_is_the_measured_file(run_dir)


def _assert_export_is_the_measured_file(run_dir: Path) -> dict:
    """export/model.onnx is the chosen trial's file as trials.jsonl recorded it (a path relative to the run
    folder, SHA-256 taken when the trial ended), with only metadata added: the same graph; returns that record."""
    import onnx

    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    (row,) = [r for r in read_jsonl(run_dir / "trials.jsonl") if r["number"] == card["candidate"]["trial"]]
    assert not Path(row["artifact"]).is_absolute() and row["artifact"].startswith("trials/"), row["artifact"]
    artifact = run_dir / row["artifact"]
    assert artifact.name == "model.onnx", artifact
    exported = run_dir / "export" / "model.onnx"
    measured, shipped = onnx.load_from_string(artifact.read_bytes()), onnx.load_from_string(exported.read_bytes())
    assert shipped.graph.SerializeToString() == measured.graph.SerializeToString()
    assert file_sha256(artifact) == row["artifact_sha256"] == card["files"]["measured_sha256"]
    assert file_sha256(exported) == card["files"]["sha256"]
    assert {p.key for p in shipped.metadata_props} >= {"hwnas.labels", "hwnas.preprocessing"}
    assert card["trial_metrics"] == row["metrics"] and card["metrics"]["model_bytes"] == len(exported.read_bytes())
    assert card["metrics"]["val_accuracy"] == row["metrics"]["val_accuracy"]
    return row


def test_exported_model_is_byte_for_byte_the_measured_file(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _, _ = sweep
    row = _assert_export_is_the_measured_file(run_dir)
    # the one trial file of every complete trial, each with the digest recorded when it ended
    for r in read_jsonl(run_dir / "trials.jsonl"):
        assert file_sha256(run_dir / r["artifact"]) == r["artifact_sha256"], r["number"]
    assert row["status"] == "COMPLETE"


def test_export_refuses_a_trial_file_changed_since_it_was_measured(
    sweep: tuple[Path, str, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    run_dir, _, _ = sweep
    copy = copy_run(run_dir, tmp_path / "run")  # the module's run stays untouched for the other tests
    # Control: the untouched copy exports (so the refusal below is the changed byte, not the copying).
    proc = hwnas_export(f"run_dir={copy}", "tracking.enabled=false")
    assert proc.returncode == 0, output_of(proc)
    row = _assert_export_is_the_measured_file(copy)
    exported = {p.name: p.read_bytes() for p in (copy / "export").iterdir()}

    artifact = copy / row["artifact"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte, inside the weights
    artifact.write_bytes(bytes(data))
    proc = hwnas_export(f"run_dir={copy}", "tracking.enabled=false")
    assert proc.returncode != 0, output_of(proc)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("hwnas-export: error:"), proc.stderr
    assert "changed since it was measured" in errors[0] and str(artifact) in errors[0]
    assert row["artifact_sha256"] in errors[0]
    assert "Traceback" not in proc.stderr
    # The refused file is not exported: the export made from the untouched file stays as it was (nothing
    # computed is lost), and nothing half-made is left beside it.
    assert {p.name: p.read_bytes() for p in (copy / "export").iterdir()} == exported
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(("export", ".export"))) == ["export"]


@pytest.mark.slow
def test_the_default_sweep_end_to_end(tmp_path: Path) -> None:
    """`hwnas` as `make search` runs it (digits, macro_cnn, TPE, Ray, MLflow), with only fewer trials,
    and the run folder and the MLflow store under tmp_path."""
    n = 3  # two concurrent slots, so one trial starts after a result: the sampler is told before it asks again
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    proc = hwnas(f"n_trials={n}", f"run_dir={run_dir}", f"tracking.uri={uri}", timeout=600)
    assert proc.returncode == 0, output_of(proc)

    # It was the default sweep.
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.dataset._target_.endswith(".DigitsData") and cfg.space._target_.endswith(".MacroCNNSpace")
    assert cfg.search._target_.endswith(".TPESampler") and cfg.runner._target_.endswith(".RayRunner")
    assert cfg.evaluator._target_.endswith(".PipelineEvaluator") and cfg.experiment_name == "default"

    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and trials["number"].is_unique
    assert (trials["status"] == "COMPLETE").all(), trials[["number", "status", "error"]]
    assert (trials["val_accuracy"] > 0.2).all()  # ten digit classes: chance is 0.1 (a 75 %-pruned int8 net may reach only 0.5)

    front = pd.read_csv(run_dir / "pareto.csv")
    assert len(front) >= 1
    assert non_dominated_mask(front[["val_accuracy", "latency_ms"]].to_numpy(), ["max", "min"]).all()
    everything = trials[["val_accuracy", "latency_ms"]].to_numpy()
    expected = trials["number"][non_dominated_mask(everything, ["max", "min"])]  # no budget by default
    assert sorted(front["number"]) == sorted(expected)

    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["candidate"]["trial"] in set(front["number"])
    # exists, and is the recorded artifact with metadata added (same graph; sha256 of the measured file recorded)
    row = _assert_export_is_the_measured_file(run_dir)
    assert card["files"]["measured_sha256"] == row["artifact_sha256"]

    parents, children = mlflow_runs(uri, "hwnas-default")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n and all(c.info.status == "FINISHED" for c in children)
    assert sorted(int(c.data.tags["trial"]) for c in children) == sorted(trials["number"])
