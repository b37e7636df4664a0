"""hwnas-predictor: fit a per-device latency predictor, apply it, export the latency cache as a table.

    hwnas-predictor fit space=nb201|macro_cnn table=DEVICE.csv out=MODEL [host_cache=PATH] [device=NAME]
                        [input=CxHxW] [host_protocol=default|fast] [families=a,b]
    hwnas-predictor predict model=MODEL table=ARCHS.csv out=PRED.csv [host_cache=PATH]
    hwnas-predictor table cache=PATH [device=ID] out=DEVICE.csv

DEVICE.csv: `arch`, `latency_ms` (the device's); keys as the tabular evaluator's tables: NAS-Bench-201
arch strings for nb201, the space's candidate name (e.g. `convw16k3d2-ir6w32k5d1`) or a `candidate`
JSON column for macro_cnn. Each network is built (NB201: C=16, N=5, 3x32x32, 10 classes; macro_cnn:
conf/space/macro_cnn.yaml, 1x32x32, 10 classes), exported to ONNX, timed on this host (cached in a
LatencyCache, so a second fit re-times nothing) and described by its ONNX features.
Bad input: one line and exit 2, before any work.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hwnas.spaces.candidate import COMPRESSION_KEYS, is_compression_key

USAGE = (
    "usage: hwnas-predictor fit space=nb201|macro_cnn table=DEVICE.csv out=MODEL [host_cache=PATH] [device=NAME] "
    "[input=CxHxW] [host_protocol=default|fast] [families=a,b] | predict model=MODEL table=ARCHS.csv out=PRED.csv "
    "[host_cache=PATH] [host_protocol=default|fast] | table cache=PATH [device=ID] out=DEVICE.csv"
)
KEYS = {
    "fit": ({"space", "table", "out"}, {"host_cache", "device", "input", "host_protocol", "families"}),
    "predict": ({"model", "table", "out"}, {"host_cache", "host_protocol"}),
    "table": ({"cache", "out"}, {"device"}),
}
SPACES = ("nb201", "macro_cnn")
DEFAULT_INPUT = {"nb201": (3, 32, 32), "macro_cnn": (1, 32, 32)}
NUM_CLASSES, NB201_C, NB201_N, OPSET, SEED = 10, 16, 5, 17, 0
MACRO_PART = re.compile(r"^(conv|dwsep|ir\d+)w(\d+)k(\d+)d(\d+)$")


class UsageError(ValueError):
    """Bad input: one line, exit 2."""


def default_host_cache() -> Path:
    root = os.environ.get("HWNAS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hwnas")
    return Path(root) / "host_latency.sqlite"


def parse_args(argv: Sequence[str]) -> tuple[str, dict[str, str]]:
    if not argv or argv[0] in ("-h", "--help", "help"):
        raise UsageError(USAGE)
    command, rest = argv[0], argv[1:]
    if command not in KEYS:
        raise UsageError(f"command {command!r} is unknown; allowed: {', '.join(KEYS)}")
    required, optional = KEYS[command]
    args: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {item!r} is not key=value; allowed keys for {command}: {', '.join(sorted(required | optional))}")
        if key not in required | optional:
            raise UsageError(f"{key}: not an argument of {command}; allowed: {', '.join(sorted(required | optional))}")
        if key in args:
            raise UsageError(f"{key}: given twice; allowed: once")
        if not value:
            raise UsageError(f"{key}: empty value; allowed: {key}=VALUE")
        args[key] = value
    missing = sorted(required - args.keys())
    if missing:
        raise UsageError(f"{missing[0]}: missing; required for {command}: {', '.join(sorted(required))}")
    return command, args


# ---- spaces: candidates from table rows, networks from candidates ----


def macro_space() -> Any:
    import importlib.resources

    import yaml

    from hwnas.spaces.macro_cnn import MacroCNNSpace

    conf = yaml.safe_load((importlib.resources.files("hwnas.conf") / "space" / "macro_cnn.yaml").read_text())
    conf.pop("_target_", None)
    return MacroCNNSpace(**conf)


def macro_from_name(name: str) -> dict[str, Any]:
    """The candidate of a macro_cnn name (`MacroCNNSpace.name`), fp32 and unpruned."""
    parts = name.split("-")
    candidate: dict[str, Any] = {"n_stages": len(parts)}
    for i, part in enumerate(parts, start=1):
        match = MACRO_PART.match(part)
        if not match:
            raise ValueError(f"arch {name!r} is not a macro_cnn name; allowed: stages like convw16k3d2 joined by '-', "
                             "or a candidate JSON column")
        block, width, kernel, depth = match.groups()
        candidate.update({f"stage{i}.depth": int(depth), f"stage{i}.width": int(width),
                          f"stage{i}.kernel": int(kernel), f"stage{i}.block": block})
    return {**candidate, "prune_ratio": 0.0, "quant": "fp32"}


def candidates_of(frame: pd.DataFrame, space: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, candidate) per row, validated by the space; a one-line ValueError naming the row otherwise."""
    out = []
    macro = macro_space() if space == "macro_cnn" else None
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{source} row {i + 2}"
        try:
            if space == "nb201":
                from hwnas.spaces.nb201 import from_arch_string, to_arch_string

                candidate: dict[str, Any] = from_arch_string(row.get("arch"))
                out.append((to_arch_string(candidate), candidate))
                continue
            if "candidate" in row and isinstance(row["candidate"], str) and row["candidate"].strip():
                try:
                    candidate = json.loads(row["candidate"])
                except json.JSONDecodeError:
                    raise ValueError(f"candidate {row['candidate'][:60]!r} is not JSON") from None
                if not isinstance(candidate, dict):
                    raise ValueError("candidate is not a JSON object")
                # Training knobs (train.*) change the weights, not the graph the latency is a property of.
                candidate = {k: v for k, v in candidate.items() if not str(k).startswith("train.")}
                # Per-stage compression (stage<k>.rank_ratio, stage<k>.precision): the uncompressed graph only.
                staged = {k: v for k, v in candidate.items() if is_compression_key(str(k)) and k not in COMPRESSION_KEYS}
                factorized = {k: v for k, v in staged.items() if str(k).endswith(".rank_ratio") and v != 1}
                if factorized:
                    key = next(iter(factorized))
                    raise ValueError(f"candidate {key}={factorized[key]!r} is compressed; allowed here: rank ratio 1 "
                                     "(for compressed files use LatencyPredictor.predict_onnx)")
                candidate = {k: v for k, v in candidate.items() if k not in staged}
                candidate = {"prune_ratio": 0.0, "quant": "fp32", **candidate}
            else:
                if not isinstance(row.get("arch"), str):
                    raise ValueError(f"arch {row.get('arch')!r} is not a name")
                candidate = macro_from_name(row["arch"])
            if candidate.get("quant") != "fp32" or candidate.get("prune_ratio") not in (0, 0.0):
                raise ValueError(
                    f"candidate quant={candidate.get('quant')!r} prune_ratio={candidate.get('prune_ratio')!r} is compressed; "
                    "allowed here: fp32, prune_ratio 0 (for compressed files use LatencyPredictor.predict_onnx)"
                )
            assert macro is not None  # space == "macro_cnn"
            candidate = macro.candidate_from_params(candidate)
            out.append((macro.name(candidate), candidate))
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return out


def export_candidate(space: str, candidate: Mapping[str, Any], input_shape: tuple[int, int, int], path: Path) -> Path:
    import torch

    from hwnas.evaluators.onnx_export import export_onnx

    if space == "nb201":
        from hwnas.spaces.nb201 import OPS, NB201Space

        built = NB201Space(ops=list(OPS), C=NB201_C, N=NB201_N, prune_ratios=[0.0], quant=["fp32"])
    else:
        built = macro_space()
    torch.manual_seed(SEED)  # fixed weights: the same candidate gives the same file, so the cache hits
    model = built.build(candidate, input_shape, NUM_CLASSES).eval()
    return export_onnx(model, torch.zeros(1, *input_shape), path, opset=OPSET)


# ---- host timing: the same local target a sweep's plan uses for the predictor's host feature ----


def host_target(kind: str) -> Any:
    """LocalTarget of this host (plan.py's `host-cpu-1thread`); `fast` only for tests and smoke runs."""
    if kind not in ("default", "fast"):
        raise UsageError(f"host_protocol: {kind!r} is not a protocol; allowed: default, fast")
    from hwnas.evaluators.measure.local import LocalTarget

    if kind == "default":
        return LocalTarget(name="host-cpu-1thread", provider="cpu")
    return LocalTarget(name="host-cpu-1thread", provider="cpu", warmup=2, repeats=5, block_ms=1.0, max_rounds=1)


def host_timer(kind: str) -> tuple[str, str, Any]:
    """(device_id, protocol_key, measure(path) -> Measurement) of this host's local protocol."""
    from hwnas.evaluators.measure.fingerprint import fingerprint_id

    target = host_target(kind)
    return fingerprint_id(target.fingerprint()), target.protocol().key(), target.measure


def host_rows(
    space: str, items: Sequence[tuple[str, Mapping[str, Any]]], input_shape: tuple[int, int, int], cache_path: Path, kind: str
) -> tuple[list[dict[str, float]], str, str]:
    """feature_row() per candidate (host latency from the cache, timed when missing); progress with ETA."""
    from hwnas.evaluators.measure.cache import LatencyCache, file_sha256
    from hwnas.evaluators.measure.features import feature_row, onnx_features

    cache = LatencyCache(cache_path)
    device_id, protocol_key, measure = host_timer(kind)
    rows, hits, start, last = [], 0, time.monotonic(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, candidate) in enumerate(items, start=1):
            path = export_candidate(space, candidate, input_shape, Path(tmp) / "model.onnx")
            sha = file_sha256(path)
            cached = cache.get(sha, device_id, protocol_key)
            if cached is not None:
                host_ms, hits = cached.median_ms, hits + 1
            else:
                record = measure(path)
                host_ms = float(record.median_ms)
                cache.put(sha, device_id, protocol_key, record, arch=name, candidate=dict(candidate), space=space)
            rows.append(feature_row(onnx_features(path), host_ms))
            now = time.monotonic()
            if now - last > 5 or i == len(items):
                last, elapsed = now, now - start
                print(f"[{i}/{len(items)}] host latency ({hits} from cache) {elapsed:.0f} s, ~{elapsed / i * (len(items) - i):.0f} s left",
                      flush=True)
    return rows, device_id, protocol_key


# ---- commands ----


def _table(path: str, need_latency: bool) -> pd.DataFrame:
    from hwnas.evaluators.tabular import read_table

    try:
        frame = read_table(path)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc).replace("evaluator.table", "table", 1)) from None
    if "arch" not in frame.columns and "candidate" not in frame.columns:
        raise UsageError(f"table: {path!r} has no 'arch' column; columns: {', '.join(map(str, frame.columns))[:120]}")
    if need_latency:
        if "latency_ms" not in frame.columns:
            raise UsageError(f"table: {path!r} has no 'latency_ms' column; allowed: columns arch, latency_ms (the device's)")
        lat = pd.to_numeric(frame["latency_ms"], errors="coerce")
        bad = frame.index[~(lat > 0) | ~lat.map(lambda v: math.isfinite(v) if isinstance(v, float) else False)]
        if len(bad):
            raise UsageError(f"table: {path!r} row {bad[0] + 2}: latency_ms {frame['latency_ms'][bad[0]]!r} is not a latency; "
                             "allowed: a positive number of ms")
        frame = frame.assign(latency_ms=lat)
    return frame


def _out_path(value: str, key: str = "out") -> Path:
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"{key}: {value!r} is a folder; allowed: a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"{key}: {value!r} cannot be written (folder not writable); allowed: a writable path")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{key}: {value!r}: {str(parent)!r} is not a folder; allowed: a writable path")
    return path


def _input_shape(value: str | None, space: str) -> tuple[int, int, int]:
    if value is None:
        return DEFAULT_INPUT[space]
    parts = value.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"input: {value!r} is not a shape; allowed: CxHxW, e.g. 3x32x32")
    shape = (int(parts[0]), int(parts[1]), int(parts[2]))
    return shape


def _host_cache(args: Mapping[str, str]) -> Path:
    from hwnas.evaluators.measure.cache import LatencyCache

    path = Path(args["host_cache"]) if "host_cache" in args else default_host_cache()
    try:
        LatencyCache(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"host_cache: {exc}") from None
    return path


def cmd_fit(args: Mapping[str, str]) -> int:
    from hwnas.evaluators.measure.predictor import FAMILIES, LatencyPredictor

    space = args["space"]
    if space not in SPACES:
        raise UsageError(f"space: {space!r} is not a space here; allowed: {', '.join(SPACES)}")
    frame = _table(args["table"], need_latency=True)
    if "device_id" in frame.columns and frame["device_id"].nunique() > 1:
        raise UsageError(f"table: {args['table']!r} holds {frame['device_id'].nunique()} devices; allowed: one (export with table device=ID)")
    out = _out_path(args["out"])
    shape = _input_shape(args.get("input"), space)
    families = args["families"].split(",") if "families" in args else None
    for f in families or ():
        if f not in FAMILIES:
            raise UsageError(f"families: {f!r} is unknown; allowed: {', '.join(FAMILIES)}")
    items = candidates_of(frame, space, args["table"])
    if len(items) < 5:
        raise UsageError(f"table: {args['table']!r} has {len(items)} rows; allowed: at least 5 device measurements (10 or more recommended)")
    if space == "nb201" and shape[1] % 4 + shape[2] % 4:
        raise UsageError(f"input: {args['input']!r}: NB201 halves the size twice; allowed: height and width divisible by 4")
    device = args.get("device") or (str(frame["device_id"].iloc[0]) if "device_id" in frame.columns else Path(args["table"]).stem)
    cache = _host_cache(args)
    host_timer(args.get("host_protocol", "default"))  # a bad protocol name is refused before any work
    # One row per distinct candidate: repeated device measurements of it are reduced to their median.
    device_ms = frame["latency_ms"].groupby([n for n, _ in items]).median()
    unique = list({n: c for n, c in items}.items())
    print(f"fit: {len(frame)} rows, {len(unique)} distinct {space} candidates; host latency cache {cache}", flush=True)
    rows, host_id, protocol_key = host_rows(space, unique, shape, cache, args.get("host_protocol", "default"))
    try:
        predictor = LatencyPredictor.fit(
            rows, [float(device_ms[n]) for n, _ in unique], device_id=device, space=space, families=families,
            context={"input_shape": list(shape), "num_classes": NUM_CLASSES, "host_device_id": host_id,
                     "host_protocol_key": protocol_key, "host_protocol": args.get("host_protocol", "default"),
                     "nb201": {"C": NB201_C, "N": NB201_N} if space == "nb201" else None, "opset": OPSET, "seed": SEED},
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    predictor.save(out)
    print(predictor.summary(), flush=True)
    print("cross-validated families: " + "; ".join(
        f"{f} MAPE {v['mape']:.1f}%" for f, v in predictor.doc["cv"].items()) + f"; wrote {out}", flush=True)
    return 0


def cmd_predict(args: Mapping[str, str]) -> int:
    from hwnas.evaluators.measure.predictor import LatencyPredictor

    try:
        predictor = LatencyPredictor.load(args["model"])
    except ValueError as exc:
        raise UsageError(f"model: {exc}") from None
    space, context = predictor.space, predictor.context
    if space not in SPACES or "input_shape" not in context:
        raise UsageError(f"model: {args['model']!r} was not fitted by hwnas-predictor fit (space {space!r}); "
                         "allowed: a model from hwnas-predictor fit, or LatencyPredictor.predict_onnx in Python")
    frame = _table(args["table"], need_latency=False)
    out = _out_path(args["out"])
    items = candidates_of(frame, space, args["table"])
    cache = _host_cache(args)
    kind = args.get("host_protocol", context.get("host_protocol", "default"))
    host_id, protocol_key, _ = host_timer(kind)
    if host_id != context.get("host_device_id") or protocol_key != context.get("host_protocol_key"):
        print(f"warning: this host ({host_id}, protocol {protocol_key}) is not the one the model was fitted with "
              f"({context.get('host_device_id')}, {context.get('host_protocol_key')}): the host-latency feature shifts "
              "and predictions may be off", file=sys.stderr, flush=True)
    unique = list({n: c for n, c in items}.items())
    rows, _, _ = host_rows(space, unique, tuple(context["input_shape"]), cache, kind)
    pred = predictor.predict_rows(rows)
    e = predictor.error
    by_name = {n: i for i, (n, _) in enumerate(unique)}
    idx = [by_name[n] for n, _ in items]
    result = pd.DataFrame({
        "arch": [n for n, _ in items], "latency_ms": pred["latency_ms"][idx],
        "latency_low_ms": pred["latency_low_ms"][idx], "latency_high_ms": pred["latency_high_ms"][idx],
        "within10_share": e["within10"], "mape": e["mape"], "spearman": e["spearman"], "n_fit": e["n_fit"],
        "outside_range": pred["outside_range"][idx], "host_ms": [rows[i]["host_ms"] for i in idx],
        "device_id": predictor.device_id, "source": "predicted",
    })
    result.to_csv(out, index=False)
    print(f"{predictor.summary()}\nwrote {out}: {len(result)} predictions", flush=True)
    return 0


def cmd_table(args: Mapping[str, str]) -> int:
    from hwnas.evaluators.measure.cache import LatencyCache

    path = Path(args["cache"])
    if not path.is_file():
        raise UsageError(f"cache: {args['cache']!r} does not exist; allowed: a latency cache file")
    out = _out_path(args["out"])
    try:
        cache = LatencyCache(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    devices = cache.devices()
    device = args.get("device")
    if device is not None and device not in devices:
        raise UsageError(f"device: {device!r} is not in {args['cache']!r}; allowed: {', '.join(devices) or '(none: the cache is empty)'}")
    if device is None and len(devices) > 1:
        raise UsageError(f"device: missing; {args['cache']!r} holds {len(devices)} devices; allowed: {', '.join(devices)}")
    frame = cache.table(device)
    frame.to_csv(out, index=False)
    print(f"wrote {out}: {len(frame)} measurements of device {device or (devices[0] if devices else '-')}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, args = parse_args(argv)
        return {"fit": cmd_fit, "predict": cmd_predict, "table": cmd_table}[command](args)
    except UsageError as exc:
        print(f"hwnas-predictor: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
