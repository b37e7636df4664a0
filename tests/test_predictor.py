"""Latency predictor: real sklearn fits on a synthetic device, its reported error, the JSON model file
(safe to load, validated), and hwnas-predictor fit / predict / table end to end on a few NB201 archs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hwnas.evaluators.measure.features import FEATURE_NAMES, feature_row
from hwnas.evaluators.measure.predictor import LatencyPredictor

ROOT = Path(__file__).resolve().parent.parent


def synthetic(n: int, seed: int) -> tuple[list[dict[str, float]], np.ndarray]:
    """Candidates with random per-kind work; the device's latency is a known additive function of it."""
    rng = np.random.default_rng(seed)
    rows, device = [], []
    for _ in range(n):
        f = dict.fromkeys(FEATURE_NAMES, 0.0)
        f["macs_conv_dense"] = rng.uniform(1e6, 1e8)
        f["macs_conv_1x1"] = rng.uniform(0, 1e7)
        f["macs_elementwise"] = rng.uniform(1e4, 1e6)
        f["nodes"] = float(rng.integers(20, 200))
        f["macs"] = f["macs_conv_dense"] + f["macs_conv_1x1"] + f["macs_elementwise"]
        f["params"] = f["macs"] / 100
        host = 0.02 + f["macs"] / 2e9 + f["nodes"] * 0.002
        truth = 0.1 + f["macs_conv_dense"] / 5e8 + f["macs_conv_1x1"] / 2e8 + f["nodes"] * 0.01
        rows.append(feature_row(f, host * rng.uniform(0.98, 1.02)))
        device.append(truth * rng.uniform(0.98, 1.02))  # 2% measurement noise
    return rows, np.array(device)


@pytest.mark.parametrize("n", [12, 120])
def test_fits_a_known_device_and_reports_its_error(n: int) -> None:
    rows, y = synthetic(n, seed=1)
    test_rows, test_y = synthetic(200, seed=2)
    p = LatencyPredictor.fit(rows, y, device_id="dev", space="synthetic")
    pred = p.predict_rows(test_rows)
    rel = pred["latency_ms"] / test_y - 1
    assert np.mean(np.abs(rel) <= 0.10) >= 0.9, p.summary()
    e = p.error
    assert e["n_fit"] == n and 0 <= e["within10"] <= 1 and e["mape"] >= 0 and -1 <= e["spearman"] <= 1
    assert e["within10"] >= 0.8 and e["spearman"] >= 0.9  # the held-out (cross-validated) figures say so too
    assert set(p.doc["cv"]) >= {"linear_host", "linear4", "additive3"}
    if n >= 100:
        assert {"gbr_resid", "rf_resid"} <= set(p.doc["cv"])
    # the band holds most held-out truths and every prediction carries it
    inside = (test_y >= pred["latency_low_ms"]) & (test_y <= pred["latency_high_ms"])
    assert inside.mean() >= 0.7
    one = p.predict({k: v for k, v in test_rows[0].items() if k != "host_ms"}, test_rows[0]["host_ms"])
    assert one.latency_low_ms <= one.latency_ms <= one.latency_high_ms and one.n_fit == n


@pytest.mark.parametrize("family", ["linear4", "additive_kinds", "gbr_resid", "rf_resid"])
def test_saved_model_predicts_the_same(tmp_path: Path, family: str) -> None:
    rows, y = synthetic(120, seed=3)
    p = LatencyPredictor.fit(rows, y, device_id="dev", space="s", families=[family])
    assert p.family == family
    q = LatencyPredictor.load(p.save(tmp_path / "m.json"))
    test_rows, _ = synthetic(50, seed=4)
    np.testing.assert_allclose(q.predict_rows(test_rows)["latency_ms"], p.predict_rows(test_rows)["latency_ms"], rtol=1e-12)
    if family.endswith("_resid"):  # the numpy tree walk equals sklearn's own predict
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

        from hwnas.evaluators.measure import predictor as mod

        x = mod._log_matrix(rows)
        resid = np.log(y) - mod._predict_linear(mod._fit_linear(x, np.log(y), mod.SMALL), x)
        model = (GradientBoostingRegressor(n_estimators=150, learning_rate=0.05, max_depth=3, subsample=0.8,
                                           min_samples_leaf=5, init="zero", random_state=0) if family == "gbr_resid"
                 else RandomForestRegressor(n_estimators=100, min_samples_leaf=3, max_features=0.5, random_state=0)).fit(x, resid)
        xt = mod._log_matrix(test_rows)
        ours = mod._predict_model(p.doc["model"], xt) - mod._predict_linear(p.doc["model"]["base"], xt)
        np.testing.assert_allclose(ours, model.predict(xt), rtol=1e-9, atol=1e-12)


def test_bad_model_files_are_refused(tmp_path: Path) -> None:
    rows, y = synthetic(120, seed=5)
    good = LatencyPredictor.fit(rows, y, device_id="dev", space="s", families=["gbr_resid"]).doc
    cases = {
        "garbage.json": b"\x80\x04\x95pickle-ish bytes",
        "list.json": b"[1, 2]",
        "other.json": json.dumps({"format": "something-else"}).encode(),
    }
    loop = json.loads(json.dumps(good))
    loop["model"]["trees"][0]["left"][0] = 0  # a cycle: node 0 -> node 0
    cases["cycle.json"] = json.dumps(loop).encode()
    nan = json.loads(json.dumps(good))
    nan["model"]["base"]["coef"][0] = "1e3"
    cases["type.json"] = json.dumps(nan).encode()
    feat = json.loads(json.dumps(good))
    feat["model"]["trees"][1]["feature"][0] = 999
    cases["feature.json"] = json.dumps(feat).encode()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            LatencyPredictor.load(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="cannot be read"):
        LatencyPredictor.load(tmp_path / "missing.json")


def test_too_few_measurements_refused() -> None:
    rows, y = synthetic(4, seed=6)
    with pytest.raises(ValueError, match="at least 5"):
        LatencyPredictor.fit(rows, y, device_id="d", space="s")


# ---- the CLI, as a user runs it ----


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from hwnas.evaluators.measure.predictor_cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


ARCHS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_1x1~1|+|skip_connect~0|skip_connect~1|skip_connect~2|",
    "|avg_pool_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|nor_conv_1x1~1|avg_pool_3x3~2|",
    "|skip_connect~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|",
    "|nor_conv_3x3~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|nor_conv_3x3~2|",
    "|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|",
]


def test_cli_fit_predict_table(tmp_path: Path) -> None:
    # A "device" 3x slower than a MAC count suggests, plus per-node overhead: any positive table will do.
    device = pd.DataFrame({"arch": ARCHS, "latency_ms": [9.0, 2.0, 3.1, 0.6, 4.0, 5.0]})
    device.to_csv(tmp_path / "dev.csv", index=False)
    common = ["host_cache=hc.sqlite", "host_protocol=fast"]
    r = cli("fit", "space=nb201", "table=dev.csv", "out=model.json", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fitted on 6 measurements" in r.stdout and "within ±10%" in r.stdout
    assert "(0 from cache)" in r.stdout
    r = cli("fit", "space=nb201", "table=dev.csv", "out=model.json", *common, cwd=tmp_path)
    assert r.returncode == 0 and "(6 from cache)" in r.stdout, r.stdout + r.stderr  # nothing timed twice
    pd.DataFrame({"arch": ARCHS[:3]}).to_csv(tmp_path / "archs.csv", index=False)
    r = cli("predict", "model=model.json", "table=archs.csv", "out=pred.csv", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert list(pred["arch"]) == ARCHS[:3]
    assert {"latency_ms", "latency_low_ms", "latency_high_ms", "within10_share", "mape", "n_fit"} <= set(pred.columns)
    assert (pred["latency_ms"] > 0).all() and (pred["n_fit"] == 6).all()
    r = cli("table", "cache=hc.sqlite", "out=host.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    host = pd.read_csv(tmp_path / "host.csv")
    assert sorted(host["arch"]) == sorted(ARCHS) and {"latency_ms", "device_id"} <= set(host.columns)
    # the exported table is itself a table `fit` reads (here: the host standing in as its own device)
    r = cli("fit", "space=nb201", "table=host.csv", "out=host_model.json", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "usage"),
        (("fly",), "command 'fly' is unknown"),
        (("fit", "space=nb201", "table=dev.csv"), "out: missing"),
        (("fit", "space=imagenet", "table=dev.csv", "out=m.json"), "space: 'imagenet'"),
        (("fit", "space=nb201", "table=dev.csv", "out=m.json", "colour=red"), "colour: not an argument"),
        (("fit", "space=nb201", "table=nothere.csv", "out=m.json"), "does not exist"),
        (("fit", "space=nb201", "table=bad_arch.csv", "out=m.json"), "row 2"),
        (("fit", "space=nb201", "table=no_latency.csv", "out=m.json"), "latency_ms"),
        (("fit", "space=nb201", "table=dev.csv", "out=m.json", "host_protocol=slow"), "host_protocol"),
        (("predict", "model=junk.json", "table=dev.csv", "out=p.csv"), "model:"),
        (("table", "cache=junk.json", "out=t.csv"), "not an SQLite file"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    pd.DataFrame({"arch": ARCHS, "latency_ms": [1.0] * 6}).to_csv(tmp_path / "dev.csv", index=False)
    pd.DataFrame({"arch": ["|bogus~0|"], "latency_ms": [1.0]}).to_csv(tmp_path / "bad_arch.csv", index=False)
    pd.DataFrame({"arch": ARCHS}).to_csv(tmp_path / "no_latency.csv", index=False)
    (tmp_path / "junk.json").write_text("not a model")
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "m.json").exists()


def test_cached_candidates_with_training_knobs_fit_the_latency_space() -> None:
    """Rows of a sweep that searched train.* knobs: the knobs change weights, not the graph, so they are dropped."""
    import optuna

    from hwnas.evaluators.measure.predictor_cli import UsageError, candidates_of
    from hwnas.spaces.macro_cnn import MacroCNNSpace

    space = MacroCNNSpace(n_stages=[2], depths=[1], widths=[8], kernels=[3], blocks=["conv"], expansions=[1],
                          stem_width=8, stem_stride=2, prune_ratios=[0.0], quant=["fp32"])
    candidate = space.suggest(optuna.trial.FixedTrial({"n_stages": 2, "prune_ratio": 0.0, "quant": "fp32",
                                                       "stage1.depth": 1, "stage1.width": 8, "stage1.kernel": 3,
                                                       "stage1.block": "conv", "stage2.depth": 1, "stage2.width": 8,
                                                       "stage2.kernel": 3, "stage2.block": "conv"}))
    frame = pd.DataFrame({"candidate": [json.dumps({**candidate, "train.lr": 0.01, "train.optimizer": "sgd",
                                                    "stage1.rank_ratio": 1.0})]})
    try:
        (name, parsed), = candidates_of(frame, "macro_cnn", "cache.csv")
    except UsageError as exc:  # a space the default config cannot hold: the test's candidate, not the rule, is wrong
        pytest.fail(str(exc))
    assert not any(k.startswith("train.") or k.endswith("rank_ratio") for k in parsed) and parsed["stage1.width"] == 8
    factorized = pd.DataFrame({"candidate": [json.dumps({**candidate, "stage1.rank_ratio": 0.5})]})
    with pytest.raises(UsageError, match=r"stage1\.rank_ratio=0\.5 is compressed"):
        candidates_of(factorized, "macro_cnn", "cache.csv")
