"""Replaying a queued MLflow operation that had partly reached the store adds nothing twice.

A tracking server can die in the middle of `op_trial_ended` (metrics logged, artifact or run end
not): the whole operation is then queued and replayed later. These tests build exactly that state
on a real SQLite store, without a server, and replay; the server-outage drill
(test_mlflow_outage.py, slow) does the same against a real `mlflow server` killed mid-sweep.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hwnas.search.tracking import MlflowStore, Tracking

METRICS = {"val_accuracy": 0.91, "latency_ms": 0.42}


@pytest.fixture
def store(tmp_path: Path) -> MlflowStore:
    return MlflowStore(f"sqlite:///{tmp_path / 'mlflow.db'}", "replay", "hwnas-replay")


def _artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx bytes")
    return path


def test_replayed_trial_end_logs_only_what_is_missing(store: MlflowStore, tmp_path: Path) -> None:
    parent = store.create_sweep("sweep", params={"seed": 0}, tags={})
    store.op_trial_started(parent, 3, {"quant": "int8"}, {"status": "RUNNING"})
    run_id = store._child[3]
    artifact = _artifact(tmp_path)
    # The part that reached the store before it went away: the metrics and the artifact.
    store._log(run_id, metrics=METRICS)
    store.client.log_artifact(run_id, str(artifact))

    fresh = MlflowStore(store.uri, store.experiment, store.registered_model)  # a new process replays
    fresh.replaying = True
    fresh.op_trial_ended(parent, 3, {"quant": "int8"}, METRICS, {"status": "COMPLETE"}, str(artifact), "FINISHED")
    fresh.op_trial_ended(parent, 3, {"quant": "int8"}, METRICS, {"status": "COMPLETE"}, str(artifact), "FINISHED")

    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["status"] == "COMPLETE"
    for name, value in METRICS.items():
        history = store.client.get_metric_history(run_id, name)
        assert [m.value for m in history] == [value], name
    assert [a.path for a in store.client.list_artifacts(run_id)] == ["model.onnx"]


def test_replayed_trial_end_completes_a_run_that_got_nothing(store: MlflowStore, tmp_path: Path) -> None:
    parent = store.create_sweep("sweep", params={}, tags={})
    fresh = MlflowStore(store.uri, store.experiment, store.registered_model)
    fresh.replaying = True
    fresh.op_trial_ended(parent, 0, {"quant": "fp32"}, METRICS, {"status": "COMPLETE"}, str(_artifact(tmp_path)), "FINISHED")
    (child,) = store.children(parent)
    assert child.info.status == "FINISHED"
    assert child.data.metrics == METRICS
    assert child.data.params == {"quant": "fp32"}


def test_queued_operations_replay_in_order_once(store: MlflowStore, tmp_path: Path) -> None:
    parent = store.create_sweep("sweep", params={}, tags={})
    tracking = Tracking(store, tmp_path, parent)
    # Operations queued while the store was away (what `_do` writes on a failed call).
    tracking._append("op_trial_started", {"parent": parent, "number": 1, "params": {"quant": "fp16"}, "tags": {}})
    ended = {"parent": parent, "number": 1, "params": {"quant": "fp16"}, "metrics": METRICS,
             "tags": {"status": "COMPLETE"}, "artifact": None, "status": "FINISHED"}
    tracking._append("op_trial_ended", ended)
    tracking._append("op_sweep_outputs", {"parent": parent, "paths": [], "metrics": {"n_trials": 1}})
    assert tracking.offline
    assert tracking.flush(force=True)
    assert not tracking.offline
    tracking._append("op_trial_ended", ended)  # replayed twice (e.g. a sync after a crash mid-flush)
    tracking._append("op_sweep_outputs", {"parent": parent, "paths": [], "metrics": {"n_trials": 1}})
    assert tracking.flush(force=True)
    (child,) = store.children(parent)
    assert [m.value for m in store.client.get_metric_history(child.info.run_id, "val_accuracy")] == [0.91]
    assert [m.value for m in store.client.get_metric_history(parent, "n_trials")] == [1]


def test_artifacts_of_an_sqlite_store_land_beside_its_file_not_in_the_current_directory(
    store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's default would be ./mlruns here
    parent = store.create_sweep("sweep", params={"seed": 0}, tags={})
    store.client.log_artifact(parent, str(_artifact(tmp_path)))
    assert (tmp_path / "mlartifacts" / "replay" / parent / "artifacts" / "model.onnx").read_bytes() == b"onnx bytes"
    assert not (cwd / "mlruns").exists()

