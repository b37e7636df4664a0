"""Latency predictor benchmark: error against the number of device measurements, on NB201 and the macro space.

    .venv/bin/python -m hwnas.scripts.bench_predictor measure [--space nb201|macro_cnn|both] [--limit N]
    .venv/bin/python -m hwnas.scripts.bench_predictor fit [--draws 10]

No second device is at hand, so a different runtime stands in for one: the same network in PyTorch
eager mode (torch.set_num_threads(1), no graph optimisation, no Conv+BN folding, Python per-module
overhead). The host is ONNX Runtime (all graph optimisations, 1 thread, batch 1): never the stand-in's
own protocol, which would make the host feature the answer. Host and stand-in are timed back to back
for each network, in alternating rounds, so load drifts on this shared machine hit both alike.

`measure` appends one JSON line per network (features, host and stand-in latency) to
results/nb201/predictor_<space>.jsonl (git-ignored) as soon as it is measured; a killed run resumes
where it stopped. `fit` draws n = 10, 30, 50, 100, 300 training networks (several seeded draws each)
from everything but a fixed held-out test set of 200, fits the predictor exactly as `hwnas-predictor fit`
does, and writes the median test error figures to results/bench/predictor.json and a curve to
results/bench/predictor.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RAW_DIR = Path("results/nb201")
BENCH_DIR = Path("results/bench")
NB201_TABLE = Path("../shared/benchmarks/nb201_accuracy.csv")
SPACES = ("nb201", "macro_cnn")
SIZES = {"nb201": 600, "macro_cnn": 520}
N_TEST = 100
N_TRAIN = (10, 30, 50, 100, 200, 300)
# A network whose timing rounds disagree by more than this (max/min of round medians, host or stand-in) was
# measured through a load burst: left out of the benchmark, and counted in the JSON.
MAX_ROUND_SPREAD = 1.25
STANDIN = "pytorch-eager-1thread"
HOST = "onnxruntime-cpu-1thread-optall"
# Timing: after warm-up, ROUNDS alternating rounds host/stand-in; a round = BLOCKS blocks of k runs, each
# block >= BLOCK_S; a round's figure is the median per-run time of its blocks; a round is clean when this
# process held a core >= MIN_CPU_SHARE of its wall time; the lowest clean median is kept (noise only adds).
ROUNDS, BLOCKS, BLOCK_S, WARMUP_S, MIN_CPU_SHARE, MAX_ROUNDS = 3, 15, 0.004, 0.05, 0.85, 8
SEED = 0


def raw_path(space: str) -> Path:
    return RAW_DIR / f"predictor_{space}.jsonl"


# ---- candidates ----


def nb201_candidates(n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """A seeded sample of distinct NB201 networks (by nb201_unique_str), each its fewest-costly-ops member."""
    import pandas as pd

    from hwnas.scripts.measure_nb201_latency import network_order

    frame = pd.read_csv(NB201_TABLE, usecols=["arch"])
    from hwnas.spaces.nb201 import from_arch_string

    return [(arch, from_arch_string(arch)) for _, arch in network_order(frame, seed)[:n]]


def macro_space() -> Any:
    from hwnas.spaces.macro_cnn import MacroCNNSpace

    # conf/space/macro_cnn.yaml, the default digits input (1x32x32); fp32, unpruned.
    return MacroCNNSpace(
        n_stages=[2, 3, 4], depths=[1, 2, 3], widths=[8, 16, 24, 32, 48, 64, 96], kernels=[3, 5],
        blocks=["conv", "dwsep", "ir"], expansions=[1, 3, 6], stem_width=16, stem_stride=2,
        prune_ratios=[0.0], quant=["fp32"],
    )


def macro_candidates(n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    space = macro_space()
    decisions = space.decisions()
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    while len(out) < n:
        params: dict[str, Any] = {"n_stages": int(rng.choice(decisions["n_stages"]))}
        for key in space.stage_keys(params["n_stages"]):
            choices = decisions[key]
            params[key] = choices[int(rng.integers(len(choices)))]
        params["prune_ratio"], params["quant"] = 0.0, "fp32"
        candidate = space.candidate_from_params(params)
        out.setdefault(space.name(candidate), candidate)
    return list(out.items())


INPUT_SHAPES = {"nb201": (3, 32, 32), "macro_cnn": (1, 32, 32)}


def build(space: str, candidate: dict[str, Any]) -> Any:
    if space == "nb201":
        from hwnas.spaces.nb201 import OPS, NB201Space

        return NB201Space(ops=list(OPS), C=16, N=5, prune_ratios=[0.0], quant=["fp32"]).build(candidate, INPUT_SHAPES[space], 10)
    return macro_space().build(candidate, INPUT_SHAPES[space], 10)


# ---- timing ----


def calibrate(fn: Callable[[], Any]) -> int:
    """Runs per block so a block lasts >= BLOCK_S, after >= WARMUP_S (and >= 5 runs) of warm-up."""
    start, runs = time.perf_counter(), 0
    while runs < 5 or time.perf_counter() - start < WARMUP_S:
        fn()
        runs += 1
    per_run = (time.perf_counter() - start) / runs
    return max(1, int(np.ceil(BLOCK_S / per_run)))


def timed_round(fn: Callable[[], Any], k: int) -> tuple[float, float, list[float]]:
    """(median ms per run over BLOCKS blocks of k runs, CPU share of the round, every block's ms per run)."""
    wall, cpu = time.perf_counter(), time.process_time()
    blocks = np.empty(BLOCKS)
    for b in range(BLOCKS):
        t0 = time.perf_counter_ns()
        for _ in range(k):
            fn()
        blocks[b] = (time.perf_counter_ns() - t0) / k / 1e6
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return float(np.median(blocks)), cpu / wall, blocks.tolist()


def measure_pair(host_fn: Callable[[], Any], standin_fn: Callable[[], Any]) -> dict[str, Any]:
    k_host, k_standin = calibrate(host_fn), calibrate(standin_fn)
    rounds: dict[str, list[tuple[float, float, list[float]]]] = {"host": [], "standin": []}
    for attempt in range(MAX_ROUNDS):
        for name, fn, k in (("host", host_fn, k_host), ("standin", standin_fn, k_standin)):
            rounds[name].append(timed_round(fn, k))
        clean = {n: [r for r in rs if r[1] >= MIN_CPU_SHARE] for n, rs in rounds.items()}
        if min(len(c) for c in clean.values()) >= ROUNDS:
            break
        if attempt >= ROUNDS - 1:
            time.sleep(0.3)  # let another job's burst pass
    out: dict[str, Any] = {}
    for name, rs in rounds.items():
        clean_rs = [r for r in rs if r[1] >= MIN_CPU_SHARE]
        # The fastest block of the clean rounds: compute is deterministic and interference (the other core,
        # another VM on the same host) only ever adds time; the lowest block median varied 30% between
        # re-measurements here under load, the fastest block far less.
        blocks = [b for r in (clean_rs or rs) for b in r[2]]
        out[f"{name}_ms"] = float(np.min(blocks))
        out[f"{name}_p10_ms"] = float(np.percentile(blocks, 10))
        out[f"{name}_median_round_ms"] = min(clean_rs or rs)[0]
        out[f"{name}_contended"] = not clean_rs
        out[f"{name}_rounds_ms"] = [round(r[0], 5) for r in rs]
    return out


def measure_network(space: str, candidate: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from hwnas.evaluators.measure.features import FEATURES_VERSION, onnx_features
    from hwnas.evaluators.onnx_export import export_onnx

    torch.manual_seed(SEED)
    model = build(space, candidate).eval()
    shape = INPUT_SHAPES[space]
    path = export_onnx(model, torch.zeros(1, *shape), tmp / "model.onnx", opset=17)
    data = path.read_bytes()
    features = onnx_features(data)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    xt = torch.from_numpy(x)

    def standin() -> Any:
        with torch.inference_mode():
            return model(xt)

    timing = measure_pair(lambda: session.run(None, feed), standin)
    return {"sha256": hashlib.sha256(data).hexdigest(), "features": features, "features_version": FEATURES_VERSION, **timing}


def load_raw(path: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # a torn line of a killed run
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["arch"]] = record
    return records


def measure(spaces: Sequence[str], limit: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    RAW_DIR.mkdir(parents=True, exist_ok=True)
    for space in spaces:
        n = limit or SIZES[space]
        todo_all = nb201_candidates(n, SEED) if space == "nb201" else macro_candidates(n, SEED)
        path = raw_path(space)
        done = load_raw(path)
        todo = [(a, c) for a, c in todo_all if a not in done]
        print(f"{space}: {len(todo_all)} networks, {len(done)} measured, {len(todo)} to go", flush=True)
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("a") as f:
                f.write("\n")
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp, path.open("a") as log:
            for i, (arch, candidate) in enumerate(todo, start=1):
                record = {"arch": arch, "candidate": candidate, "space": space, **measure_network(space, candidate, Path(tmp))}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if i % 20 == 0 or i == len(todo):
                    elapsed = time.monotonic() - start
                    print(f"[{space} {i}/{len(todo)}] {elapsed / 60:.1f} min, ~{elapsed / i * (len(todo) - i) / 60:.1f} min left, "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)


# ---- fit ----


NOTES = (
    "NB201 goal (Spearman >= 0.95 and >= 85% within 10% from <= 50 device measurements) not met with this stand-in: "
    "PyTorch eager does not run the ONNX graph the features describe (no Conv+BN folding, no merging of identical "
    "ReLU/AvgPool branches that the ONNX exporter shares between cell edges), so work the stand-in does is invisible "
    "in the file; least squares on the arch's own op counts (oracle_op_counts_loo) reaches ~84% within 10%, the "
    "measurement-noise ceiling here. Measured on a 2-core VM shared with other engineers' runs: networks whose rounds "
    "disagreed by > MAX_ROUND_SPREAD were dropped (dropped_noisy), leaving fewer networks than planned (n=100/300 "
    "missing for NB201)."
)


def cpu_info() -> dict[str, Any]:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": model or platform.processor(), "logical_cores": os.cpu_count(),
        "avx2": "avx2" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx512f": "avx512f" in flags,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def fit(draws: int) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from hwnas.evaluators.measure.features import feature_row
    from hwnas.evaluators.measure.predictor import LatencyPredictor

    summary: dict[str, Any] = {
        "what": "latency predictor error on held-out networks vs the number of device measurements it was fitted on",
        "host": HOST, "device_stand_in": STANDIN,
        "stand_in_why": "no second device here: PyTorch eager (1 thread, no graph optimisation or Conv+BN folding, Python "
        "per-module overhead) stands in; never the host's own protocol",
        "timing": {"rounds": ROUNDS, "blocks": BLOCKS, "block_s": BLOCK_S, "min_cpu_share": MIN_CPU_SHARE,
                   "interleaved": "host and stand-in rounds alternate for each network"},
        "notes": NOTES, "draws": draws, "cpu": cpu_info(), "spaces": {},
        "command": "python -m hwnas.scripts.bench_predictor measure && python -m hwnas.scripts.bench_predictor fit",
    }
    for space in SPACES:
        measured = list(load_raw(raw_path(space)).values())
        def spread(r: dict[str, Any], name: str) -> float:
            return max(r[f"{name}_rounds_ms"]) / min(r[f"{name}_rounds_ms"])

        records = [r for r in measured if spread(r, "host") <= MAX_ROUND_SPREAD and spread(r, "standin") <= MAX_ROUND_SPREAD]
        if len(records) < 40:
            print(f"{space}: {len(records)} usable networks, need >= 40; skipped", flush=True)
            continue
        n_test = min(N_TEST, len(records) // 2)  # fixed held-out set; the rest is the pool training draws come from
        rng = np.random.default_rng(SEED)
        order = rng.permutation(len(records))
        test = [records[i] for i in order[:n_test]]
        pool = [records[i] for i in order[n_test:]]
        x_test = [feature_row(r["features"], r["host_ms"]) for r in test]
        y_test = np.array([r["standin_ms"] for r in test])
        host_test = np.array([r["host_ms"] for r in test])
        macs_test = np.array([r["features"]["macs"] for r in test])
        baseline = {**oracle(space, records, test),
            "spearman_host_latency": float(spearmanr(host_test, y_test)[0]),
            "spearman_macs": float(spearmanr(macs_test, y_test)[0]),
        }
        rows = []
        for n in N_TRAIN:
            if n > len(pool):
                continue
            per_draw = []
            for d in range(draws):
                idx = np.random.default_rng(1000 * n + d).choice(len(pool), n, replace=False)
                train = [pool[i] for i in idx]
                predictor = LatencyPredictor.fit(
                    [feature_row(r["features"], r["host_ms"]) for r in train], [r["standin_ms"] for r in train],
                    device_id=STANDIN, space=space,
                )
                pred = predictor.predict_rows(x_test)
                rel = pred["latency_ms"] / y_test - 1
                per_draw.append({
                    "within10": float(np.mean(np.abs(rel) <= 0.10)),
                    "mape": float(np.mean(np.abs(rel)) * 100),
                    "spearman": float(spearmanr(pred["latency_ms"], y_test)[0]),
                    "band_coverage": float(np.mean((y_test >= pred["latency_low_ms"]) & (y_test <= pred["latency_high_ms"]))),
                    "reported_within10": predictor.error["within10"], "reported_mape": predictor.error["mape"],
                    "reported_spearman": predictor.error["spearman"], "family": predictor.family,
                })
                if len(idx) == len(pool):
                    break  # every draw would be the same
            row = {"n_device": n, "draws": len(per_draw)}
            for key in ("within10", "mape", "spearman", "band_coverage", "reported_within10", "reported_mape", "reported_spearman"):
                row[key] = float(np.median([p[key] for p in per_draw]))
            row["families"] = {f: sum(p["family"] == f for p in per_draw) for f in sorted({p["family"] for p in per_draw})}
            rows.append(row)
            print(f"{space} n={n}: within10 {row['within10']:.3f} mape {row['mape']:.1f}% spearman {row['spearman']:.3f} "
                  f"families {row['families']}", flush=True)
        standin = np.array([r["standin_ms"] for r in records])
        host = np.array([r["host_ms"] for r in records])
        summary["spaces"][space] = {
            "input_shape": list(INPUT_SHAPES[space]), "n_test": n_test, "n_pool": len(pool), "n_measured": len(measured), "n_used": len(records),
            "dropped_noisy": len(measured) - len(records), "max_round_spread": MAX_ROUND_SPREAD,
            "contended": int(sum(r["host_contended"] or r["standin_contended"] for r in records)),
            "host_ms_range": [float(host.min()), float(np.median(host)), float(host.max())],
            "standin_ms_range": [float(standin.min()), float(np.median(standin)), float(standin.max())],
            "baselines_on_test": baseline, "curve": rows,
        }
        if space == "nb201":
            at50 = next((r for r in rows if r["n_device"] == 50), None)
            if at50:
                summary["goal_nb201_at_50"] = {
                    "spearman": at50["spearman"], "within10": at50["within10"],
                    "met": at50["spearman"] >= 0.95 and at50["within10"] >= 0.85,
                }
    return summary


def oracle(space: str, records: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, float]:
    """NB201 only: least squares of the stand-in's latency on the cell's op counts, leave-one-out over all
    used networks: how well ANY additive per-op model could do, i.e. the ceiling set by measurement noise."""
    if space != "nb201":
        return {}
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_predict

    from hwnas.spaces.nb201 import OPS, from_arch_string

    counts = np.array([[sum(v == op for v in from_arch_string(r["arch"]).values()) for op in OPS] for r in records])
    y = np.array([r["standin_ms"] for r in records])
    rel = cross_val_predict(LinearRegression(), counts, y, cv=LeaveOneOut()) / y - 1
    return {"oracle_op_counts_loo_within10": float(np.mean(np.abs(rel) <= 0.10)),
            "oracle_op_counts_loo_mape": float(np.mean(np.abs(rel)) * 100)}


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for space, data in summary["spaces"].items():
        n = [r["n_device"] for r in data["curve"]]
        for ax, key, label in zip(axes, ("within10", "mape", "spearman"), ("share within ±10%", "MAPE (%)", "Spearman ρ"), strict=True):
            ax.plot(n, [r[key] for r in data["curve"]], marker="o", label=space)
            ax.set_xscale("log")
            ax.set_xlabel("device measurements fitted")
            ax.set_title(label)
    axes[0].axhline(0.85, ls="--", c="grey", lw=0.8)
    axes[2].axhline(0.95, ls="--", c="grey", lw=0.8)
    axes[0].legend()
    fig.suptitle(f"Latency predictor, held-out {summary['n_test']} networks; device = {summary['device_stand_in']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("measure", "fit"))
    p.add_argument("--space", choices=(*SPACES, "both"), default="both")
    p.add_argument("--limit", type=int, default=None, help="measure only the first N networks of the seeded order")
    p.add_argument("--draws", type=int, default=10, help="random training draws per n (median reported)")
    args = p.parse_args(argv)
    if args.phase == "measure":
        measure(SPACES if args.space == "both" else (args.space,), args.limit)
        return 0
    summary = fit(args.draws)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / "predictor.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, BENCH_DIR / "predictor.png")
    print(f"wrote {BENCH_DIR / 'predictor.json'} and predictor.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
