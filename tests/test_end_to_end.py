"""A real sweep: Hydra -> Ray Tune + Optuna -> Lightning -> pruning + quantization -> ONNX Runtime -> MLflow.

Nothing is mocked: Ray starts a local instance, trials train with Lightning in Ray workers, every
metric comes from ONNX Runtime sessions, and MLflow writes a real SQLite store in tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.search.pareto import non_dominated_mask

ROOT = Path(__file__).resolve().parent.parent


def hwnas(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from hwnas.search.cli import run; run()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir, uri = tmp / "run", f"sqlite:///{tmp}/mlflow.db"
    proc = hwnas(
        "experiment=smoke", "runner=ray", "runner.max_concurrent=2", "n_trials=6", "search=tpe",
        f"run_dir={run_dir}", f"tracking.uri={uri}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, uri, proc


def test_six_trials_recorded_everywhere(sweep: tuple[Path, str, subprocess.CompletedProcess[str]]) -> None:
    run_dir, uri, proc = sweep
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 6
    assert set(trials["status"]) <= {"COMPLETE", "FAILED"}
    complete = trials[trials["status"] == "COMPLETE"]
    assert len(complete) >= 5
    for col in ("val_accuracy", "latency_ms", "latency_p90_ms", "model_bytes", "params", "macs", "train_s"):
        assert complete[col].notna().all(), col
    assert (complete["latency_ms"] > 0).all() and (complete["latency_ms"] <= complete["latency_p90_ms"]).all()
    assert "done" in proc.stdout  # the progress line was shown

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("hwnas-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)  # nothing left RUNNING
    for c in children:
        assert c.data.tags["pareto"] in ("true", "false")
        if c.info.status == "FINISHED":
            assert {"val_accuracy", "latency_ms", "model_bytes"} <= set(c.data.metrics)
            assert any(a.path.endswith(".onnx") for a in client.list_artifacts(c.info.run_id))
    assert sum(c.data.tags["pareto"] == "true" for c in children) == int(trials["pareto"].sum())


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
    assert onnx_accuracy(str(model), x, y) == card["val_accuracy"]
    x_test, y_test = data.arrays("test")
    assert onnx_accuracy(str(model), x_test, y_test) == card["test_accuracy"]
    assert 0.0 <= card["test_accuracy"] <= 1.0
    for key in ("candidate", "latency_ms", "latency_p90_ms", "model_bytes", "hardware", "libraries", "seed", "sha256"):
        assert key in card
    assert card["model_bytes"] == model.stat().st_size
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'hwnas-smoke'")
    assert len(versions) == 1


def test_reexport_with_a_budget_without_retraining(sweep: tuple[Path, str, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    run_dir, uri, _ = sweep
    trials = pd.read_csv(run_dir / "trials.csv")
    complete = trials[trials["status"] == "COMPLETE"]
    budget = float(np.median(complete["latency_ms"]))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from hwnas.search.cli import export_main; sys.exit(export_main())",
         f"run_dir={run_dir}", f"objective.latency_budget_ms={budget}", f"tracking.uri={uri}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["latency_ms"] <= budget
    feasible = complete[complete["latency_ms"] <= budget]
    assert card["val_accuracy"] == feasible["val_accuracy"].max()
    # no trial was added or retrained
    assert len(pd.read_csv(run_dir / "trials.csv")) == len(trials)
    assert len((run_dir / "trials.jsonl").read_text().splitlines()) == len(trials)
