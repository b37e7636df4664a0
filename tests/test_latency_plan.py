"""How a sweep records latency: the device and protocol of every figure, the cache across sweeps, and
formats refused where the target does not compute in them. Real sweeps (local runner: trials in the
driver process, measured with ONNX Runtime under the node's measurement lock), a real MLflow SQLite store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import hwnas, mlflow_runs, output_of, read_jsonl

from hwnas.evaluators.measure.fingerprint import device_fingerprint, fingerprint_id
from hwnas.evaluators.measure.protocol import Measurement

FAST = ("experiment=smoke", "runner=local", "n_trials=3", "space.quant=[fp32,int8]", "hardware.repeats=5",
        "hardware.block_ms=0.5", "evaluator.epochs=1", "evaluator.finetune_epochs=0")


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two sweeps of one experiment folder: the second proposes the same candidates (same seed)."""
    tmp = tmp_path_factory.mktemp("plan")
    uri = f"sqlite:///{tmp}/mlflow.db"
    first, second = tmp / "exp" / "a", tmp / "exp" / "b"
    for run_dir in (first, second):
        proc = hwnas(*FAST, f"run_dir={run_dir}", f"tracking.uri={uri}", timeout=600)
        assert proc.returncode == 0, output_of(proc)
    return first, second, uri


def test_every_figure_names_its_device_and_protocol(two_sweeps: tuple[Path, Path, str]) -> None:
    first, _, uri = two_sweeps
    hardware = json.loads((first / "hardware.json").read_text())
    here = fingerprint_id(device_fingerprint("cpu"))
    assert hardware["device_id"] == here and hardware["kind"] == "LocalTarget"
    assert hardware["fingerprint"]["cpu_model"] and "isolation" in hardware
    # What each format computes on this target; fp16 is not offered on a CPU (it would compute in fp32).
    assert "fp16" not in hardware["formats"] and "MatMulNBits" in hardware["formats"]["int4"]
    assert hardware["protocol"]["blocks"] == 5 and hardware["protocol"]["block_s"] == pytest.approx(0.0005)

    trials = pd.read_csv(first / "trials.csv")
    assert (trials["status"] == "COMPLETE").all(), trials["error"].tolist()
    assert (trials["device_id"] == here).all() and (trials["latency_protocol"] == hardware["protocol_key"]).all()
    for col in ("latency_p99_ms", "latency_cv", "latency_resolution_pct", "latency_rounds", "latency_runs"):
        assert trials[col].notna().all(), col
    assert (trials["latency_cached"] == 0).all() and (trials["latency_predicted"] == 0).all()
    for row in read_jsonl(first / "trials.jsonl"):
        record = json.loads((first / row["artifact"]).parent.joinpath("latency.json").read_text())
        m = Measurement.from_dict(record["measurement"])
        assert m.device_id == here and m.median_ms == pytest.approx(row["metrics"]["latency_ms"])
        assert m.source == "measured" and m.protocol == hardware["protocol"]

    parents, children = mlflow_runs(uri, "hwnas-smoke")
    parent = next(p for p in parents if p.data.tags["run_dir"] == str(first.resolve()))
    assert parent.data.tags["device_id"] == here and parent.data.tags["protocol_key"] == hardware["protocol_key"]
    assert parent.data.params["device.id"] == here and parent.data.params["protocol.blocks"] == "5"
    assert parent.data.params["device.cpu"] == hardware["fingerprint"]["cpu_model"]
    assert parent.data.params["format.int8"] == hardware["formats"]["int8"]
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert len(mine) == 3 and all(c.data.tags["device_id"] == here for c in mine)
    assert all("latency_cv" in c.data.metrics for c in mine)


def test_a_file_is_never_measured_twice_on_one_device(two_sweeps: tuple[Path, Path, str]) -> None:
    first, second, _ = two_sweeps
    a, b = pd.read_csv(first / "trials.csv"), pd.read_csv(second / "trials.csv")
    # Same seed, same candidates, same trained weights: byte-identical files, answered from the cache.
    assert list(a["arch_id"]) == list(b["arch_id"])
    assert (b["latency_cached"] == 1).all()
    assert list(b["latency_ms"]) == pytest.approx(list(a["latency_ms"]))
    assert b["time/latency_s"].max() < a["time/latency_s"].min()
    assert (first.parent / "latency_cache.sqlite").is_file()
    rows = read_jsonl(second / "trials.jsonl")
    assert all(json.loads((second / r["artifact"]).parent.joinpath("latency.json").read_text())["measurement"]["source"] == "cache"
               for r in rows)


def test_a_format_the_target_does_not_compute_is_refused_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp" / "run"
    proc = hwnas("experiment=smoke", "runner=local", "space.quant=[fp32,fp16]", f"run_dir={run_dir}",
                 "tracking.enabled=false")
    assert proc.returncode == 2, output_of(proc)
    line = proc.stderr.strip().splitlines()[-1]
    assert "space.quant" in line and "fp16" in line and "allowed:" in line and "fp32" in line
    assert not (tmp_path / "exp").exists()  # no run folder, no cache file: nothing was written


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("hardware.prescreen=true", "hardware.prescreen"),
        ("hardware.predictor=/nonexistent/model.json", "hardware"),
        ("hardware.cache=7", "hardware.cache"),
        ("hardware.block_ms=0", "hardware.block_ms"),
        ("hardware.affinity=all", "hardware.affinity"),
    ],
)
def test_bad_plan_settings_are_one_line_exit_2(tmp_path: Path, override: str, needle: str) -> None:
    proc = hwnas("experiment=smoke", "runner=local", "space.quant=[fp32]", override,
                 f"run_dir={tmp_path / 'run'}", "tracking.enabled=false")
    assert proc.returncode == 2, output_of(proc)
    line = proc.stderr.strip().splitlines()[-1]
    assert needle in line and "allowed" in line, line
    assert not (tmp_path / "run").exists()


def test_cli_accepts_remote_only_with_urls(tmp_path: Path) -> None:
    proc = hwnas("experiment=smoke", "hardware=remote", f"run_dir={tmp_path / 'run'}", "tracking.enabled=false")
    assert proc.returncode == 2 and "hardware.urls" in proc.stderr, output_of(proc)


# ---- a predictor instead of (or before) the device ----------------------------------------------------


@pytest.fixture(scope="module")
def predictor_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A predictor fitted on 12 smoke-space networks for a synthetic device (2.5x this host + 5 µs):
    no second device exists here, so the device's latencies are made up; the fit, the file, the
    features and this host's timings are real."""
    import torch
    from omegaconf import OmegaConf

    from hwnas.evaluators.measure.features import feature_row, onnx_features
    from hwnas.evaluators.measure.predictor import LatencyPredictor
    from hwnas.evaluators.measure.predictor_cli import host_target
    from hwnas.evaluators.onnx_export import export_onnx
    from hwnas.spaces.macro_cnn import MacroCNNSpace

    tmp = tmp_path_factory.mktemp("predictor")
    space_cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "space" / "macro_cnn.yaml"))
    space_cfg.pop("_target_")
    space = MacroCNNSpace(**{**space_cfg, "n_stages": [1, 2], "depths": [1], "widths": [8, 16, 24, 32]})
    host = host_target("fast")
    rows, device_ms = [], []
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(12):
        candidate = space.suggest(study.ask())
        path = export_onnx(space.build(candidate, (1, 16, 16), 4).eval(), torch.zeros(1, 1, 16, 16), tmp / f"{i}.onnx", opset=17)
        host_ms = host.measure(path).median_ms
        rows.append(feature_row(onnx_features(path), host_ms))
        device_ms.append(2.5 * host_ms + 0.005)
    predictor = LatencyPredictor.fit(rows, device_ms, device_id="synthetic-device", space="macro_cnn",
                                     context={"host_protocol": "fast"})
    return predictor.save(tmp / "device.json")


def test_predicted_latencies_carry_the_predictor_error(tmp_path: Path, predictor_file: Path) -> None:
    run_dir = tmp_path / "exp" / "run"
    proc = hwnas(*FAST, f"run_dir={run_dir}", "tracking.enabled=false", f"hardware.predictor={predictor_file}")
    assert proc.returncode == 0, output_of(proc)
    assert "predicted for device synthetic-device" in proc.stdout
    hardware = json.loads((run_dir / "hardware.json").read_text())
    assert hardware["device_id"] == "synthetic-device" and hardware["predictor"]["n_fit"] == 12
    trials = pd.read_csv(run_dir / "trials.csv")
    assert (trials["status"] == "COMPLETE").all(), trials["error"].tolist()
    assert (trials["latency_predicted"] == 1).all() and (trials["device_id"] == "synthetic-device").all()
    assert list(trials["latency_ms"]) == pytest.approx(list(trials["latency_pred_ms"]))
    assert (trials["latency_pred_low_ms"] <= trials["latency_ms"]).all()
    assert (trials["latency_ms"] <= trials["latency_pred_high_ms"]).all()
    assert (trials["latency_pred_n"] == 12).all() and trials["latency_pred_within10"].between(0, 1).all()
    for row in read_jsonl(run_dir / "trials.jsonl"):
        record = json.loads((run_dir / row["artifact"]).parent.joinpath("latency.json").read_text())
        assert record["measurement"]["source"] == "predicted" and record["prediction"]["host_ms"] > 0


@pytest.mark.parametrize(("budget", "prescreened"), [(1e-6, 1.0), (1000.0, 0.0)])
def test_prescreen_skips_only_candidates_predicted_far_over_budget(
    tmp_path: Path, predictor_file: Path, budget: float, prescreened: float
) -> None:
    # latency_first off: every candidate trains, so the prescreen's own effect is what is seen.
    run_dir = tmp_path / "exp" / "run"
    proc = hwnas(*FAST, f"run_dir={run_dir}", "tracking.enabled=false", f"hardware.predictor={predictor_file}",
                 "hardware.prescreen=true", f"objective.latency_budget_ms={budget}", "scheduler.latency_first=false")
    assert proc.returncode == 0, output_of(proc)
    trials = pd.read_csv(run_dir / "trials.csv")
    assert (trials["status"] == "COMPLETE").all(), trials["error"].tolist()
    assert (trials["latency_prescreened"] == prescreened).all()
    assert (trials["latency_predicted"] == prescreened).all()
    assert trials["latency_pred_ms"].notna().all()  # the prediction is recorded either way
    if prescreened:  # never sent to the device: the latency is the prediction, and over budget
        assert (trials["feasible"] == False).all()  # noqa: E712
    else:  # measured on the device (this machine): a real protocol's figures
        assert (trials["latency_runs"] > 0).all() and (trials["device_id"] == fingerprint_id(device_fingerprint("cpu"))).all()


def test_prescreen_with_latency_first_rejects_predicted_far_over_before_training(
    tmp_path: Path, predictor_file: Path
) -> None:
    # The default (latency_first on): the untrained file goes through the same plan, so a candidate predicted far
    # over budget is never sent to the device and never trained; its row carries the prediction it was judged on.
    run_dir = tmp_path / "exp" / "run"
    proc = hwnas(*FAST, f"run_dir={run_dir}", "tracking.enabled=false", f"hardware.predictor={predictor_file}",
                 "hardware.prescreen=true", "objective.latency_budget_ms=1e-6")
    assert proc.returncode == 0, output_of(proc)
    trials = pd.read_csv(run_dir / "trials.csv")
    assert (trials["status"] == "REJECTED").all(), trials["error"].tolist()
    assert (trials["epochs"] == 0).all() and (trials["feasible"] == False).all()  # noqa: E712
    assert trials["error"].str.contains("rejected before training").all()
    assert (trials["latency_prescreened"] == 1).all() and (trials["latency_predicted"] == 1).all()
    assert list(trials["latency_ms"]) == pytest.approx(list(trials["latency_pred_ms"]))
