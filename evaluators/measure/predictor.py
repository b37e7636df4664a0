"""Per-device latency predictor: device latency from the ONNX file's features and the host latency.

Fitted with scikit-learn on log latency. The model family is chosen by cross-validation among a few:
linear models on log features (robust at 10 device measurements), additive models (non-negative least
squares on relative error: latency as a sum of per-kind costs of MACs, weights and nodes per op type,
plus a share of the host latency) and, from MIN_TREES measurements on, gradient boosting / random forest on the residual of the linear model (trees cannot extrapolate;
the linear part can). The error always travels with the model: out-of-fold (K-fold, leave-one-out
below 20) share within ±10%, MAPE, Spearman, n fitted, and a relative band from the out-of-fold log
residuals that every prediction carries.

Saved as plain JSON (coefficients, scaler, tree arrays): loading runs no code from the file, so a
model from an untrusted folder is safe to load; `load` validates every field and array.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.evaluators.measure.features import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    KINDS,
    feature_row,
    onnx_features,
)

FORMAT = "hwnas-latency-predictor"
VERSION = 1
MAX_BYTES = 64 << 20
MIN_TREES = 100  # richer families are tried from this many device measurements on
BAND = (0.05, 0.95)  # the per-prediction band: these quantiles of the out-of-fold relative errors
INPUTS = (*FEATURE_NAMES, "host_ms")
# Feature subsets of the linear families (names of INPUTS); log-transformed.
SMALL = ("host_ms", "macs", "params", "nodes")
# Additive families (ms space): latency is a sum of per-op costs, so a non-negative mix of per-kind work,
# node count (per-op overhead) and host latency fits structure a log-linear model cannot.
ADDITIVE_SMALL = ("host_ms", "macs", "nodes")
ADDITIVE_KINDS = ("host_ms", *(f"macs_{k}" for k in KINDS), "nodes", "activation_bytes")
# Per-kind work and per-kind node counts: each kind of op has its own per-call overhead on a device.
ADDITIVE_NODES = ("host_ms", *(f"macs_{k}" for k in KINDS), *(f"nodes_{k}" for k in KINDS))
# Per-op-type node counts of the graph as exported (features v2): a runtime without fusion runs one kernel per
# node, Identity copies and unfused activations included, each with its own per-call cost.
OP_NODES = tuple(f"nodes_{g}" for g in ("free", "activation", "binary", "norm", "shape"))
ADDITIVE_OPS = (*ADDITIVE_NODES, *OP_NODES)
# ... plus weights per kind: a runtime without weight prepacking or layout transforms (and any memory-bound
# device) pays for every weight it reads, per kind of layer.
ADDITIVE_PARAMS = (*ADDITIVE_OPS, *(f"params_{k}" for k in KINDS))
# The same with fewer free parameters: total work and nodes by op type (for 20-50 measurements).
ADDITIVE_OPS_SMALL = ("host_ms", "macs", "nodes", *OP_NODES)
FAMILIES = ("linear_host", "linear4", "additive3", "additive_ops_small", "additive_kinds", "additive_nodes", "additive_ops",
            "additive_params", "linear_all", "gbr_resid", "rf_resid")
# Fewest device measurements a family is tried at: about two per free parameter for the log-linear ones, so
# that leave-one-out selection among families is not won by a model that merely has room to fit 10 points.
# The additive (NNLS) families get fewer: non-negative per-kind costs leave most columns at zero, and on both
# benchmark spaces and both stand-ins (scripts/bench_predictor.py, CV on training draws) additive_kinds from
# 10 measurements beat the smaller families.
MIN_N = {"linear_host": 5, "linear4": 8, "additive3": 8, "additive_ops_small": 10, "additive_kinds": 10, "additive_nodes": 12,
         "additive_ops": 16, "additive_params": 24, "linear_all": 50,
         "gbr_resid": MIN_TREES, "rf_resid": MIN_TREES}


@dataclass(frozen=True)
class Prediction:
    """A predicted latency with the predictor's error beside it."""

    latency_ms: float
    latency_low_ms: float
    latency_high_ms: float
    within10_share: float  # out-of-fold share of the device measurements predicted within ±10%
    mape: float  # out-of-fold mean absolute percentage error (%)
    spearman: float
    n_fit: int
    outside_range: bool  # the candidate lies outside the fitted range of host latency / MACs / params / nodes
    device_id: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _log_matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Inputs -> log space: log1p for counts, log for the host latency (ms > 0)."""
    checked = [feature_row(r, r["host_ms"]) if "host_ms" in r else feature_row(r, float("nan")) for r in rows]
    x = np.array([[r[k] for k in INPUTS] for r in checked], dtype=np.float64)
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError("features: negative or non-finite values; allowed: onnx_features() output and a positive host_ms")
    out = np.log1p(x)
    out[:, -1] = np.log(x[:, -1])
    return out


def _columns(names: Sequence[str]) -> list[int]:
    return [INPUTS.index(n) for n in names]


# ---- model families: fit with sklearn, export to JSON-able dicts, predict from those dicts with numpy ----


def _fit_linear(x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    from sklearn.linear_model import RidgeCV

    cols = _columns(names)
    xs = x[:, cols]
    mean, scale = xs.mean(axis=0), xs.std(axis=0)
    scale[scale == 0] = 1.0
    # Standardised inputs, ridge penalty chosen by (efficient) leave-one-out inside the fit: the log features
    # are strongly correlated, and 10 measurements cannot pin four free slopes without some shrinkage.
    model = RidgeCV(alphas=np.logspace(-4, 2, 13)).fit((xs - mean) / scale, y)
    return {"kind": "linear", "inputs": list(names), "mean": mean.tolist(), "scale": scale.tolist(),
            "coef": np.asarray(model.coef_).tolist(), "intercept": float(model.intercept_), "alpha": float(model.alpha_)}


def _predict_linear(m: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    xs = x[:, _columns(m["inputs"])]
    return ((xs - np.array(m["mean"])) / np.array(m["scale"])) @ np.array(m["coef"]) + m["intercept"]


def _fit_additive(raw: np.ndarray, y_ms: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    from scipy.optimize import nnls

    cols = _columns(names)
    xs = np.c_[raw[:, cols], np.ones(len(raw))]
    scale = xs.mean(axis=0)
    scale[scale == 0] = 1.0
    # Rows divided by the measured latency: least squares on relative error, as the figures are judged.
    w = 1.0 / y_ms
    coef, _ = nnls((xs / scale) * w[:, None], y_ms * w)
    return {"kind": "additive", "inputs": list(names), "scale": scale.tolist(), "coef": coef.tolist()}


def _predict_additive(m: Mapping[str, Any], raw: np.ndarray) -> np.ndarray:
    xs = np.c_[raw[:, _columns(m["inputs"])], np.ones(len(raw))]
    ms = (xs / np.array(m["scale"])) @ np.array(m["coef"])
    return np.log(np.maximum(ms, 1e-6))


def _tree_dict(tree: Any) -> dict[str, Any]:
    t = tree.tree_
    return {"left": t.children_left.tolist(), "right": t.children_right.tolist(), "feature": t.feature.tolist(),
            "threshold": t.threshold.tolist(), "value": t.value[:, 0, 0].tolist()}


def _predict_tree(t: Mapping[str, Any], x32: np.ndarray) -> np.ndarray:
    left, right = np.asarray(t["left"]), np.asarray(t["right"])
    feature, threshold, value = np.asarray(t["feature"]), np.asarray(t["threshold"]), np.asarray(t["value"])
    node = np.zeros(len(x32), dtype=np.int64)
    rows = np.arange(len(x32))
    for _ in range(len(left)):  # children always have higher indices (checked on load): terminates
        active = left[node] >= 0
        if not active.any():
            break
        go_left = x32[rows, np.maximum(feature[node], 0)] <= threshold[node]
        node = np.where(active, np.where(go_left, left[node], right[node]), node)
    return value[node]


def _fit_trees(x: np.ndarray, y: np.ndarray, kind: str, seed: int) -> dict[str, Any]:
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

    base = _fit_linear(x, y, SMALL)
    resid = y - _predict_linear(base, x)
    if kind == "gbr_resid":
        gbr = GradientBoostingRegressor(n_estimators=150, learning_rate=0.05, max_depth=3, subsample=0.8,
                                        min_samples_leaf=5, init="zero", random_state=seed).fit(x, resid)
        trees = [_tree_dict(e[0]) for e in gbr.estimators_]
        scale = float(gbr.learning_rate)
    else:
        rf = RandomForestRegressor(n_estimators=100, min_samples_leaf=3, max_features=0.5, random_state=seed).fit(x, resid)
        trees = [_tree_dict(e) for e in rf.estimators_]
        scale = 1.0 / len(trees)
    return {"kind": "trees", "family": kind, "base": base, "tree_scale": scale, "trees": trees}


def _predict_trees(m: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    # sklearn compares float32 inputs against float64 thresholds: do the same to predict identically.
    x32 = x.astype(np.float32).astype(np.float64)
    total = np.zeros(len(x))
    for t in m["trees"]:
        total += _predict_tree(t, x32)
    return _predict_linear(m["base"], x) + m["tree_scale"] * total


def _raw(x: np.ndarray) -> np.ndarray:
    raw = np.expm1(x)
    raw[:, -1] = np.exp(x[:, -1])
    return raw


def _fit_family(family: str, x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    if family == "additive3":
        return _fit_additive(_raw(x), np.exp(y), ADDITIVE_SMALL)
    if family == "additive_kinds":
        return _fit_additive(_raw(x), np.exp(y), ADDITIVE_KINDS)
    if family == "additive_nodes":
        return _fit_additive(_raw(x), np.exp(y), ADDITIVE_NODES)
    if family == "additive_ops":
        return _fit_additive(_raw(x), np.exp(y), ADDITIVE_OPS)
    if family == "additive_params":
        return _fit_additive(_raw(x), np.exp(y), ADDITIVE_PARAMS)
    if family == "additive_ops_small":
        return _fit_additive(_raw(x), np.exp(y), ADDITIVE_OPS_SMALL)
    if family == "linear_host":
        return _fit_linear(x, y, ("host_ms",))
    if family == "linear4":
        return _fit_linear(x, y, SMALL)
    if family == "linear_all":
        return _fit_linear(x, y, INPUTS)
    return _fit_trees(x, y, family, seed)


def _predict_model(m: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    if m["kind"] == "additive":
        return _predict_additive(m, _raw(x))
    return _predict_linear(m, x) if m["kind"] == "linear" else _predict_trees(m, x)


def _folds(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, LeaveOneOut

    splitter = LeaveOneOut() if n < 20 else KFold(n_splits=5, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(n)))


def error_figures(pred_ms: np.ndarray, true_ms: np.ndarray) -> dict[str, float]:
    from scipy.stats import spearmanr

    rel = pred_ms / true_ms - 1
    rho = spearmanr(pred_ms, true_ms)[0] if len(true_ms) > 2 and np.ptp(true_ms) > 0 else float("nan")
    return {"within10": float(np.mean(np.abs(rel) <= 0.10)), "mape": float(np.mean(np.abs(rel)) * 100),
            "spearman": float(rho) if np.isfinite(rho) else float("nan")}


class LatencyPredictor:
    """A fitted per-device model and its cross-validated error. Build with `fit` or `load`."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    # -- fields --
    family = property(lambda self: self.doc["family"])
    device_id = property(lambda self: self.doc["device_id"])
    context = property(lambda self: self.doc["context"])
    space = property(lambda self: self.doc["space"])
    n_fit = property(lambda self: self.doc["n_fit"])
    error = property(lambda self: self.doc["error"])

    @classmethod
    def fit(
        cls, rows: Sequence[Mapping[str, float]], latency_ms: Sequence[float], *, device_id: str, space: str,
        families: Sequence[str] | None = None, seed: int = 0, context: Mapping[str, Any] | None = None,
    ) -> LatencyPredictor:
        """Fit on device measurements: `rows` are feature_row() dicts (file features + host_ms), `latency_ms` the device's."""
        y_ms = np.asarray(latency_ms, dtype=np.float64)
        if len(rows) != len(y_ms):
            raise ValueError(f"latency_ms: {len(y_ms)} values for {len(rows)} rows; allowed: one per row")
        if len(y_ms) < 5:
            raise ValueError(f"device measurements: {len(y_ms)} given; allowed: at least 5 (10 or more recommended)")
        if not (np.all(np.isfinite(y_ms)) and np.all(y_ms > 0)):
            raise ValueError("latency_ms: non-positive or non-finite values; allowed: positive milliseconds")
        x, y = _log_matrix(rows), np.log(y_ms)
        n = len(y)
        for f in families or ():
            if f not in FAMILIES:
                raise ValueError(f"families: {f!r} is unknown; allowed: {', '.join(FAMILIES)}")
        tried = [f for f in (families or FAMILIES) if n >= MIN_N[f]]
        if not tried:
            raise ValueError(f"families: none of {list(families or FAMILIES)} is usable at n={n}; allowed: "
                             + ", ".join(f"{f} (n>={k})" for f, k in MIN_N.items()))
        folds = _folds(n, seed)
        cv: dict[str, dict[str, float]] = {}
        oof: dict[str, np.ndarray] = {}
        for family in tried:
            pred = np.empty(n)
            for train, test in folds:
                pred[test] = _predict_model(_fit_family(family, x[train], y[train], seed), x[test])
            oof[family] = pred
            cv[family] = {**error_figures(np.exp(pred), y_ms), "mean_abs_log_error": float(np.mean(np.abs(pred - y)))}
        # Lowest mean |log error| (~ MAPE, robust to the odd outlier); ties go to the simpler family (listed first).
        best = min(tried, key=lambda f: (round(cv[f]["mean_abs_log_error"], 6), tried.index(f)))
        resid = y - oof[best]  # log(true / predicted) out of fold
        lo, hi = np.quantile(resid, BAND)
        error = {**{k: cv[best][k] for k in ("within10", "mape", "spearman")}, "n_fit": n,
                 "method": "leave-one-out" if n < 20 else "5-fold", "band_quantiles": list(BAND),
                 "band_log": [float(lo), float(hi)]}
        ranges = {k: [float(x[:, INPUTS.index(k)].min()), float(x[:, INPUTS.index(k)].max())] for k in SMALL}
        doc = {
            "format": FORMAT, "version": VERSION, "features_version": FEATURES_VERSION, "inputs": list(INPUTS),
            "device_id": str(device_id), "space": str(space), "family": best, "n_fit": n, "error": error,
            "cv": cv, "log_ranges": ranges, "model": _fit_family(best, x, y, seed),
            # How the candidates were built and the host timed (hwnas-predictor rebuilds them the same way).
            "context": json.loads(json.dumps(dict(context or {}))),
        }
        return cls(doc)

    # -- predict --

    def predict_rows(self, rows: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
        """Arrays latency_ms, latency_low_ms, latency_high_ms, outside_range for feature_row() dicts."""
        x = _log_matrix(rows)
        pred = np.exp(_predict_model(self.doc["model"], x))
        lo, hi = self.doc["error"]["band_log"]
        outside = np.zeros(len(x), dtype=bool)
        for k, (a, b) in self.doc["log_ranges"].items():
            col, margin = x[:, INPUTS.index(k)], 0.05 * max(b - a, 0.1)
            outside |= (col < a - margin) | (col > b + margin)
        return {"latency_ms": pred, "latency_low_ms": pred * math.exp(lo), "latency_high_ms": pred * math.exp(hi),
                "outside_range": outside}

    def predict(self, features: Mapping[str, float], host_ms: float) -> Prediction:
        out = self.predict_rows([feature_row(features, host_ms)])
        e = self.doc["error"]
        return Prediction(
            latency_ms=float(out["latency_ms"][0]), latency_low_ms=float(out["latency_low_ms"][0]),
            latency_high_ms=float(out["latency_high_ms"][0]), within10_share=e["within10"], mape=e["mape"],
            spearman=e["spearman"], n_fit=e["n_fit"], outside_range=bool(out["outside_range"][0]), device_id=self.device_id,
        )

    def predict_onnx(self, onnx_path: str | Path | bytes, host_ms: float) -> Prediction:
        """A sweep's entry point: the trial's ONNX file and its host latency (ms, local protocol) -> Prediction."""
        return self.predict(onnx_features(onnx_path), host_ms)

    def summary(self) -> str:
        e = self.doc["error"]
        return (f"device {self.device_id}: {self.family} fitted on {e['n_fit']} measurements; {e['method']} held-out: "
                f"{e['within10'] * 100:.0f}% within ±10%, MAPE {e['mape']:.1f}%, Spearman {e['spearman']:.3f}; "
                f"90% band x{math.exp(e['band_log'][0]):.2f}..x{math.exp(e['band_log'][1]):.2f}")

    # -- files --

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.doc, allow_nan=True, separators=(",", ":")))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor:
        """A predictor saved by `save`; any other file -> one-line ValueError. Runs nothing from the file."""
        path = Path(path)
        allowed = f"a JSON latency predictor written by hwnas-predictor fit ({FORMAT} v{VERSION})"
        try:
            if path.stat().st_size > MAX_BYTES:
                raise ValueError(f"predictor: {str(path)!r} is larger than {MAX_BYTES >> 20} MiB; allowed: {allowed}")
            doc = json.loads(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"predictor: {str(path)!r} cannot be read ({exc.strerror}); allowed: {allowed}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"predictor: {str(path)!r} is not JSON; allowed: {allowed}") from None
        try:
            _validate(doc)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"predictor: {str(path)!r}: {exc}; allowed: {allowed}") from None
        return cls(doc)


# ---- validation of a loaded document ----


def _num_list(value: Any, name: str, n: int | None = None) -> list[float]:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise ValueError(f"{name} is not a list of {n if n is not None else 'some'} numbers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} holds {v!r}, not a finite number")
    return value


def _validate_linear(m: Any, name: str) -> None:
    if not isinstance(m, dict) or m.get("kind") != "linear":
        raise ValueError(f"{name} is not a linear model")
    inputs = m["inputs"]
    if not isinstance(inputs, list) or not inputs or any(i not in INPUTS for i in inputs):
        raise ValueError(f"{name}.inputs is not a list of known inputs")
    for key in ("mean", "scale", "coef"):
        _num_list(m[key], f"{name}.{key}", len(inputs))
    if any(s == 0 for s in m["scale"]):
        raise ValueError(f"{name}.scale holds 0")
    _num_list([m["intercept"]], f"{name}.intercept")


def _validate_tree(t: Any, name: str) -> None:
    if not isinstance(t, dict):
        raise ValueError(f"{name} is not a tree")
    n = len(t["left"])
    if n == 0:
        raise ValueError(f"{name} is empty")
    for key in ("left", "right", "feature", "threshold", "value"):
        _num_list(t[key], f"{name}.{key}", n)
    left, right, feature = (np.asarray(t[k]) for k in ("left", "right", "feature"))
    idx = np.arange(n)
    leaf = left < 0
    for arr, key in ((left, "left"), (right, "right"), (feature, "feature")):
        if np.any(arr != np.round(arr)):
            raise ValueError(f"{name}.{key} holds a non-integer")
    # Internal nodes point forward (termination) and inside the tree; their features are real inputs.
    if np.any((right < 0) != leaf) or np.any(~leaf & ((left <= idx) | (right <= idx) | (left >= n) | (right >= n))):
        raise ValueError(f"{name} has a child index out of order or range")
    if np.any(~leaf & ((feature < 0) | (feature >= len(INPUTS)))):
        raise ValueError(f"{name}.feature holds an index out of range")


def _validate(doc: Any) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("no 'format': 'hwnas-latency-predictor' field")
    if doc.get("version") != VERSION:
        raise ValueError(f"version {doc.get('version')!r} is not {VERSION}")
    if doc.get("features_version") != FEATURES_VERSION:
        raise ValueError(f"features_version {doc.get('features_version')!r} is not {FEATURES_VERSION} (refit it)")
    if doc.get("inputs") != list(INPUTS):
        raise ValueError("inputs differ from this version's features (refit it)")
    if doc.get("family") not in FAMILIES:
        raise ValueError(f"family {doc.get('family')!r} is unknown")
    if not isinstance(doc.get("context"), dict):
        raise ValueError("context is not an object")
    for key in ("device_id", "space"):
        if not isinstance(doc.get(key), str):
            raise ValueError(f"{key} is not a string")
    n = doc.get("n_fit")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_fit {n!r} is not a positive integer")
    e = doc["error"]
    if not isinstance(e, dict):
        raise ValueError("error is not an object")
    _num_list([e["within10"], e["mape"]], "error")
    if not isinstance(e["spearman"], (int, float)):
        raise ValueError("error.spearman is not a number")
    _num_list(e["band_log"], "error.band_log", 2)
    if e.get("n_fit") != n:
        raise ValueError("error.n_fit differs from n_fit")
    ranges = doc["log_ranges"]
    if not isinstance(ranges, dict) or set(ranges) != set(SMALL):
        raise ValueError("log_ranges is not the fitted ranges")
    for k, v in ranges.items():
        _num_list(v, f"log_ranges.{k}", 2)
    m = doc["model"]
    if not isinstance(m, dict):
        raise ValueError("model is not an object")
    if m.get("kind") == "linear":
        _validate_linear(m, "model")
    elif m.get("kind") == "additive":
        inputs = m["inputs"]
        if not isinstance(inputs, list) or not inputs or any(i not in INPUTS for i in inputs):
            raise ValueError("model.inputs is not a list of known inputs")
        _num_list(m["scale"], "model.scale", len(inputs) + 1)
        _num_list(m["coef"], "model.coef", len(inputs) + 1)
        if any(v == 0 for v in m["scale"]):
            raise ValueError("model.scale holds 0")
    elif m.get("kind") == "trees":
        _validate_linear(m["base"], "model.base")
        _num_list([m["tree_scale"]], "model.tree_scale")
        if not isinstance(m["trees"], list) or not m["trees"]:
            raise ValueError("model.trees is not a list of trees")
        for i, t in enumerate(m["trees"]):
            _validate_tree(t, f"model.trees[{i}]")
    else:
        raise ValueError(f"model.kind {m.get('kind')!r} is unknown")
