"""The export as an MLflow model: saved, logged, registered, loaded back and served, on real parts.

A small CNN exported with the project's own exporter (dynamic batch axis, `input` -> `logits`), a
real SQLite MLflow store, ONNX Runtime for the reference scores, and `mlflow models predict` as a
subprocess. Queued operations are made by pointing a store at a closed loopback port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from omegaconf import OmegaConf

from hwnas.search.config import ConfigError
from hwnas.search.mlflow_model import ModelFileError, read_metadata, save_mlflow_model, verify_same_model
from hwnas.search.run_folder import check_pending
from hwnas.search.tracking import PENDING_FILE, MlflowStore, Tracking, ui_command, ui_link

K = 5
META = {"hwnas.labels": json.dumps([f"class{i}" for i in range(K)]), "hwnas.preprocessing": json.dumps({"mean": [0.5] * 3})}
DATA = {
    "kind": "image_folder", "path": "/data/flowers", "fingerprint": "0123456789abcdef",
    "classes": [f"class{i}" for i in range(K)], "input_shape": [3, 8, 8], "splits": {"train": 40, "val": 10, "test": 10},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from torch import nn

    from hwnas.evaluators.onnx_export import export_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, K))
    return export_onnx(net, torch.zeros(1, 3, 8, 8), tmp_path_factory.mktemp("src") / "model.onnx", opset=17)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)


def _ort_scores(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@pytest.fixture
def export_dir(tmp_path: Path, source: Path, batch: np.ndarray) -> Path:
    out = tmp_path / "run" / "export"
    out.parent.mkdir()
    save_mlflow_model(source, out, metadata=META, example=batch[:2])
    (out / "model_card.json").write_text(json.dumps({"arch_id": "abc"}))
    return out


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """An SQLite store that `models:/` URIs resolve against (fluent API reads these variables)."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    return uri


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nothing listens there


# ---- the folder ----

def test_saved_folder_loads_with_pyfunc_and_onnx_and_predicts_like_ort(tmp_path: Path, source: Path, batch: np.ndarray) -> None:
    import mlflow.onnx
    import mlflow.pyfunc

    out = tmp_path / "export"
    info = save_mlflow_model(source, out, metadata=META, example=batch[:2])
    expected = _ort_scores(source.read_bytes(), batch)
    assert expected.shape == (6, K)

    scores = mlflow.pyfunc.load_model(str(out)).predict(batch)["logits"]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    loaded = mlflow.onnx.load_model(str(out))
    np.testing.assert_allclose(_ort_scores(loaded.SerializeToString(), batch), expected, rtol=1e-6, atol=1e-6)

    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    assert mlmodel["metadata"] == META
    assert mlmodel["flavors"]["onnx"]["data"] == info["model_file"] == "model.onnx"
    sig_in = json.loads(mlmodel["signature"]["inputs"])
    sig_out = json.loads(mlmodel["signature"]["outputs"])
    assert sig_in == [{"name": "input", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 8, 8]}}]
    assert sig_out == [{"name": "logits", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, K]}}]
    assert np.asarray(json.loads((out / "input_example.json").read_text())).shape == (2, 3, 8, 8)
    reqs = (out / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"onnx", "onnxruntime", "numpy"}, reqs
    # Self-contained: the weights are in model.onnx, no external-data file beside it.
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "MLmodel", "conda.yaml", "input_example.json", "model.onnx", "python_env.yaml", "requirements.txt",
        "serving_input_example.json",
    ])
    import hashlib

    assert info["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert info["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["graph_sha256"] == hashlib.sha256(onnx.load_model_from_string(source.read_bytes()).graph.SerializeToString()).hexdigest()


def test_metadata_props_read_back_and_the_graph_is_the_sources(export_dir: Path, source: Path) -> None:
    assert read_metadata(export_dir / "model.onnx") == META
    assert read_metadata(source) == {}
    verify_same_model(source, export_dir / "model.onnx")  # only metadata_props differ


def test_a_tampered_graph_is_refused(tmp_path: Path, source: Path, export_dir: Path, batch: np.ndarray,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load_model_from_string((export_dir / "model.onnx").read_bytes())
    weights = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    weights.flat[0] += 1.0
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weights, model.graph.initializer[0].name))
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(model.SerializeToString())
    with pytest.raises(ModelFileError, match="differ from"):
        verify_same_model(source, tampered)

    # The check inside save_mlflow_model: a writer that changes a weight on the way to disk.
    real_save = onnx.save_model

    def changing_save(proto: onnx.ModelProto, path: str, **kwargs: object) -> None:
        proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weights, proto.graph.initializer[0].name))
        real_save(proto, path, **kwargs)

    monkeypatch.setattr(onnx, "save_model", changing_save)
    with pytest.raises(ModelFileError, match="differ from"):
        save_mlflow_model(source, tmp_path / "bad", metadata=META, example=batch[:1])


def test_refusals_are_one_line(tmp_path: Path, source: Path, batch: np.ndarray, export_dir: Path) -> None:
    with pytest.raises(ModelFileError, match="exists"):
        save_mlflow_model(source, export_dir, metadata=META, example=batch)
    with pytest.raises(ModelFileError, match="does not fit"):
        save_mlflow_model(source, tmp_path / "a", metadata=META, example=batch[:, :, :4])
    with pytest.raises(ModelFileError, match="input type"):
        save_mlflow_model(source, tmp_path / "b", metadata=META, example=batch.astype(np.float64))
    with pytest.raises(ModelFileError, match="string"):
        save_mlflow_model(source, tmp_path / "c", metadata={"n": 3}, example=batch)  # type: ignore[dict-item]
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.onnx"):
        save_mlflow_model(tmp_path / "junk.onnx", tmp_path / "d", metadata=META, example=batch)
    assert not any((tmp_path / n).exists() for n in "abcd")


# ---- logged, registered, loaded from the registry ----

def _sweep(uri: str, run_dir: Path) -> Tracking:
    store = MlflowStore(uri, "mm", "hwnas-mm")
    parent = store.create_sweep("sweep", params={"seed": 0}, tags={})
    return Tracking(store, run_dir, parent)


def test_log_export_registers_a_loadable_version_on_a_run_of_its_own(
    registry: str, export_dir: Path, source: Path, batch: np.ndarray, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.onnx
    import mlflow.pyfunc

    tracking = _sweep(registry, export_dir.parent)
    client = tracking.store.client
    with monkeypatch.context() as m:  # hwnas' own store is used, whatever the process-wide URI says
        m.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{export_dir.parent}/elsewhere.db")
        got = tracking.log_export(
            export_dir, "export-abc", params={"arch_id": "abc"}, metrics={"test_accuracy": 0.8, "latency_ms": 0.0123},
            tags={"hwnas.arch_id": "abc"}, version_tags={"latency_ms": "0.0123", "device": "cpu-x86"},
        )
        assert not tracking.offline
    assert got is not None and got["name"] == "hwnas-mm" and got["version"] == "1"

    expected = _ort_scores(source.read_bytes(), batch)
    scores = mlflow.pyfunc.load_model("models:/hwnas-mm/latest").predict(batch)["logits"]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    proto = mlflow.onnx.load_model("models:/hwnas-mm/1")
    np.testing.assert_allclose(_ort_scores(proto.SerializeToString(), batch), expected, rtol=1e-6, atol=1e-6)
    assert {p.key: p.value for p in proto.metadata_props} == META

    version = client.get_model_version("hwnas-mm", "1")
    assert version.run_id == got["run_id"] and version.source == f"models:/{got['model_id']}"
    assert version.tags["model_id"] == got["model_id"]  # an SQL registry keeps no model_id column
    assert version.tags["device"] == "cpu-x86" and version.tags["latency_ms"] == "0.0123"
    assert version.tags["sha256"] == tracking.store.client.get_run(got["run_id"]).data.tags["hwnas.export_sha256"]

    run = client.get_run(got["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == tracking.parent_id
    assert run.data.tags["hwnas.role"] == "export" and run.data.tags["hwnas.sweep_run_id"] == tracking.parent_id
    assert run.data.tags["hwnas.arch_id"] == "abc" and run.info.run_name == "export-abc"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"arch_id": "abc"} and run.data.metrics["test_accuracy"] == 0.8
    assert [o.model_id for o in run.outputs.model_outputs] == [got["model_id"]]
    artifacts = {a.path for a in client.list_artifacts(got["run_id"], "export")}
    assert {"export/MLmodel", "export/model.onnx", "export/model_card.json"} <= artifacts
    (model,) = client.search_logged_models([tracking.store.experiment_id])
    assert model.model_id == got["model_id"] and model.source_run_id == got["run_id"] and str(model.status) == "READY"

    # The same file exported again (a re-export, or a replay): nothing new, fresh figures win.
    again = tracking.log_export(
        export_dir, "export-abc", params={"arch_id": "abc"}, metrics={"test_accuracy": 0.8, "latency_ms": 0.0125},
        tags={}, version_tags={"latency_ms": "0.0125", "device": "cpu-x86"},
    )
    assert again == got
    assert len(client.search_model_versions("name = 'hwnas-mm'")) == 1
    assert len(client.search_logged_models([tracking.store.experiment_id])) == 1
    assert client.get_model_version("hwnas-mm", "1").tags["latency_ms"] == "0.0125"
    assert [m.value for m in client.get_metric_history(got["run_id"], "test_accuracy")] == [0.8]
    assert [m.value for m in client.get_metric_history(got["run_id"], "latency_ms")] == [0.0123, 0.0125]
    exports = [r for r in tracking.store.children(tracking.parent_id) if r.data.tags.get("hwnas.role") == "export"]
    assert len(exports) == 1


def test_log_export_waits_on_disk_when_mlflow_is_away_and_registers_once_on_flush(
    registry: str, export_dir: Path, batch: np.ndarray,
) -> None:
    import mlflow.pyfunc

    run_dir = export_dir.parent
    live = _sweep(registry, run_dir)
    away = Tracking(MlflowStore(f"http://127.0.0.1:{_closed_port()}", "mm", "hwnas-mm"), run_dir, live.parent_id)
    assert away.log_export(export_dir, "export-abc", {}, {"test_accuracy": 0.8}, {}, {"device": "cpu"}) is None
    (line,) = (run_dir / PENDING_FILE).read_text().splitlines()
    assert json.loads(line)["op"] == "op_log_export"
    check_pending(run_dir, OmegaConf.create({}))  # the run-folder check accepts the queued operation

    replay = Tracking(MlflowStore(registry, "mm", "hwnas-mm"), run_dir, live.parent_id)
    assert replay.flush(force=True) and not (run_dir / PENDING_FILE).exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == registry  # the process-wide setting is left as it was
    client = replay.store.client
    (version,) = client.search_model_versions("name = 'hwnas-mm'")
    assert version.tags["device"] == "cpu"
    assert mlflow.pyfunc.load_model("models:/hwnas-mm/latest").predict(batch)["logits"].shape == (6, K)
    # Replaying the same line again (a flush that died before rewriting the file) adds nothing.
    (run_dir / PENDING_FILE).write_text(line + "\n")
    assert replay.flush(force=True)
    assert len(client.search_model_versions("name = 'hwnas-mm'")) == 1
    assert len(client.search_logged_models([replay.store.experiment_id])) == 1


def test_a_queued_export_of_a_folder_elsewhere_is_refused(tmp_path: Path, export_dir: Path) -> None:
    run_dir = tmp_path / "other_run"
    run_dir.mkdir()
    op = {"op": "op_log_export", "parent": "p", "export_dir": str(export_dir), "run_name": "x",
          "params": {}, "metrics": {}, "tags": {}, "version_tags": {}}
    (run_dir / PENDING_FILE).write_text(json.dumps(op) + "\n")
    with pytest.raises(ConfigError, match="export_dir"):
        check_pending(run_dir, OmegaConf.create({}))


def test_mlflow_models_predict_on_the_export_folder(tmp_path: Path, export_dir: Path, source: Path, batch: np.ndarray) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": batch[:3].tolist()}))
    out = tmp_path / "predictions.json"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.run(
        [str(mlflow_cli), "models", "predict", "-m", str(export_dir), "-i", str(request), "-t", "json",
         "-o", str(out), "--env-manager", "local"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions = json.loads(out.read_text())["predictions"]
    scores = np.asarray(predictions["logits"] if isinstance(predictions, dict) else predictions, dtype=np.float32)
    np.testing.assert_allclose(scores, _ort_scores(source.read_bytes(), batch[:3]), rtol=1e-5, atol=1e-5)


# ---- dataset inputs ----

def test_dataset_input_on_the_parent_and_a_trial_run_once_each(tmp_path: Path) -> None:
    tracking = _sweep(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    tracking.trial_started(0, {"width": 8}, {})
    for _ in range(2):  # idempotent
        tracking.log_dataset(None, DATA)
        tracking.log_dataset(0, DATA)
    client = tracking.store.client
    for run_id in (tracking.parent_id, tracking.store.child(tracking.parent_id, 0)):
        assert run_id is not None
        (di,) = client.get_run(run_id).inputs.dataset_inputs
        assert di.dataset.digest == "0123456789abcdef" and di.dataset.name == "image_folder:flowers"
        assert di.dataset.source_type == "hwnas"
        assert json.loads(di.dataset.source) == {"kind": "image_folder", "path": "/data/flowers"}
        assert json.loads(di.dataset.profile) == {"splits": {"train": 40, "val": 10, "test": 10}}
        assert json.loads(di.dataset.schema)["input_shape"] == [3, 8, 8]
        assert {t.key: t.value for t in di.tags} == {"mlflow.data.context": "training"}
    tracking.log_dataset(None, {**DATA, "fingerprint": None})  # skipped with a warning, nothing queued
    assert not tracking.offline
    assert len(client.get_run(tracking.parent_id).inputs.dataset_inputs) == 1


# ---- links into the UI ----

def test_links_open_the_runs_table_of_the_classic_ml_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert ui_link(uri, "7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_link(uri, "7", "abc", ui="http://host:8080/") == (
        "http://host:8080/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    assert ui_link("http://10.0.0.2:5000/", "3") == "http://10.0.0.2:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    monkeypatch.chdir(tmp_path)  # a relative store path reads the same from any folder
    assert ui_command("sqlite:///sub/m.db") == f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/sub/m.db"
    assert ui_command("http://h:5000/").startswith("open http://h:5000 ")
    # An experiment hwnas makes says it is an ML one, so the UI asks no "which kind" question.
    store = MlflowStore(uri, "kinds", "m")
    assert store.client.get_experiment(store.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_installed_ui_reads_workflow_type_from_the_route_query() -> None:
    """The link form rests on the installed UI: it takes `workflowType` from the URL's query and has
    a `runs` tab; this fails when an MLflow upgrade changes that."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "\n".join(p.read_text(errors="replace") for p in js.glob("*.js"))
    assert 'MACHINE_LEARNING="machine_learning"' in bundle
    assert re.search(r'\.get\("workflowType"\)', bundle)
    assert "createHashRouter" in bundle and '"/experiments/:experimentId/:tabName"' in bundle
