"""Does searching every compression knob jointly find a better front than architecture + pruning + one format?

    .venv/bin/python -m hwnas.scripts.bench_compress [--out results/bench/compress.json] [--trials 12] \
        [--seeds 0,1,2] [--epochs 4] [--photos /path/to/image_folder] [-- hwnas overrides ...]

For each dataset (scikit-learn's digits; with --photos also an RGB image folder read at 32x32, e.g. one made
by `python -m hwnas.scripts.make_photo_folder`) and each seed, two sweeps with the same number of trials,
run as `make search` runs (a subprocess; MLflow off):

- `base`: the default space: architecture, `prune_ratio`, one `quant` (fp32 or int8) for the whole network;
- `all`: the same plus every knob of issue 13: per-stage precision (`stage<k>.precision`), low-rank
  factorization (`stage<k>.rank_ratio`), training hyperparameters (`train.lr`, `train.weight_decay`,
  `train.label_smoothing`), distillation from a teacher trained once per data fingerprint and seed
  (`distill.temperature`, `distill.weight` in [0, 0.3, 0.7]: 0 is distillation off) and quantization-aware training
  of int8 candidates (`compression.qat_epochs`). Every searched knob can be off, so the joint space holds the base
  one. Training epochs are not searched: both arms train every candidate alike.
`--reuse DIR --reuse-arms base` reads the finished sweeps of those arms from an earlier run's folder instead of
running them again (same script, same overrides); their wall time is then first trial start to last trial end.

Per sweep: the hypervolume of its (val accuracy, latency) front, against one reference per dataset (accuracy
0, 1.1 x the slowest latency any sweep of that dataset measured), and the latency of the fastest model within
1 accuracy point of the sweep's best. Per dataset: medians over seeds and the ratio all / base. From the
`all` sweeps' int8 trials that ran QAT also: their fp32 twin, PTQ and QAT accuracies. The machine and the
wall time of each sweep are recorded; the teacher's training is inside the first `all` sweep of each seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.scripts.sweep_run import machine, run_search, split_overrides, trial_rows
from hwnas.search.pareto import hypervolume, non_dominated_mask

ROOT = Path.cwd()
DIRECTIONS = ("max", "min")  # val_accuracy, latency_ms
WITHIN = 0.01  # "within 1 accuracy point of the best"


def all_knobs(epochs: int, teacher_dir: Path) -> list[str]:
    """The overrides that turn every issue-13 knob on (beside the default space)."""
    return [
        "space.stage_precision=true",
        "space.rank_ratios=[1.0,0.5,0.25]",
        "space.train={lr:{low:0.001,high:0.01,log:true},weight_decay:[0.0,0.0001],label_smoothing:[0.0,0.1]}",
        # Weight 0 is the knob off: every knob can be off, so the joint space holds the base space.
        "space.distill={temperature:[2.0,4.0],weight:[0.0,0.3,0.7]}",
        "compression.qat_epochs=1",
        "compression.distill.teacher=train",
        f"compression.distill.teacher_epochs={2 * epochs}",
        f"compression.distill.cache_dir={teacher_dir}",
    ]


def points(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(val_accuracy, latency_ms) of every finished trial with both."""
    out = [
        (r["metrics"]["val_accuracy"], r["metrics"]["latency_ms"])
        for r in rows
        if r.get("status") == "COMPLETE" and "val_accuracy" in r.get("metrics", {})
        and "latency_ms" in r.get("metrics", {})
    ]
    return np.asarray(out, float).reshape(-1, 2)


def fastest_within(pts: np.ndarray, within: float = WITHIN) -> dict[str, float]:
    """The fastest point whose accuracy is within `within` of the best accuracy (pure)."""
    if len(pts) == 0:
        raise ValueError("no finished trial")
    best = float(pts[:, 0].max())
    ok = pts[pts[:, 0] >= best - within - 1e-12]
    i = int(np.argmin(ok[:, 1]))
    return {"best_accuracy": best, "accuracy": float(ok[i, 0]), "latency_ms": float(ok[i, 1])}


def summarize_sweep(pts: np.ndarray, reference: Sequence[float]) -> dict[str, Any]:
    front = pts[non_dominated_mask(pts, DIRECTIONS)]
    return {
        "trials": int(len(pts)),
        "hypervolume": hypervolume(pts, DIRECTIONS, reference),
        "front": sorted(map(list, front.tolist()), key=lambda p: p[1]),
        "fastest_within_1pt": fastest_within(pts),
    }


def qat_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """int8 trials that ran QAT: their fp32 twin, PTQ and QAT (the file's) val accuracies, and whether on the front."""
    pts = points(rows)
    front = {tuple(p) for p in pts[non_dominated_mask(pts, DIRECTIONS)].tolist()} if len(pts) else set()
    out = []
    for r in rows:
        m = r.get("metrics", {})
        if "ptq_val_accuracy" not in m:
            continue
        out.append({
            "trial": r["number"], "fp32": m["float_val_accuracy"], "ptq": m["ptq_val_accuracy"],
            "qat": m["val_accuracy"], "latency_ms": m["latency_ms"],
            "on_front": (m["val_accuracy"], m["latency_ms"]) in front,
        })
    return out


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/compress.json")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--photos", type=Path, default=None, help="an RGB image folder (read at 32x32)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier run's compress_runs/<stamp> folder: its finished sweeps of an arm in --reuse-arms are read, not run again")
    parser.add_argument("--reuse-arms", default="base")
    args = parser.parse_args(own)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = ROOT / "results/bench/compress_runs" / time.strftime("%Y%m%d-%H%M%S")
    datasets: dict[str, list[str]] = {"digits": ["dataset=digits"]}
    if args.photos is not None:
        if not args.photos.is_dir():
            raise SystemExit(f"--photos: {str(args.photos)!r} is not a folder; allowed: an image folder (class/<files>)")
        datasets["photos32"] = ["dataset=image_folder", f"dataset.path={args.photos.resolve()}", "dataset.resolution=32"]
    arms = {"base": lambda: [], "all": lambda: all_knobs(args.epochs, work / "teachers")}
    report: dict[str, Any] = {
        "command": " ".join(["python -m hwnas.scripts.bench_compress", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "trials": args.trials, "seeds": seeds, "epochs": args.epochs,
        "overrides": {arm: make() for arm, make in arms.items()}, "extra_overrides": extra, "datasets": {},
    }
    reused: list[str] = []
    report["reused_sweeps"] = reused  # their wall_s: first trial start to last trial end
    for name, data_overrides in datasets.items():
        sweeps: dict[str, dict[int, list[dict[str, Any]]]] = {arm: {} for arm in arms}
        wall: dict[str, dict[int, float]] = {arm: {} for arm in arms}
        for seed in seeds:
            for arm, make in arms.items():
                run_dir = work / f"{name}-{arm}-s{seed}"
                earlier = args.reuse / run_dir.name if args.reuse is not None else None
                if earlier is not None and arm in args.reuse_arms.split(",") and (earlier / "trials.jsonl").is_file():
                    rows = trial_rows(earlier)
                    if len(rows) == args.trials:  # the same sweep (same overrides: this script's), finished
                        sweeps[arm][seed] = rows
                        wall[arm][seed] = max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)
                        reused.append(str(earlier))
                        print(f"[bench_compress] {name} {arm} seed {seed}: read from {earlier}", flush=True)
                        continue
                print(f"[bench_compress] {name} {arm} seed {seed} ...", flush=True)
                overrides = [*data_overrides, f"seed={seed}", f"evaluator.epochs={args.epochs}", *make(), *extra]
                wall[arm][seed] = run_search(run_dir, args.trials, overrides, ROOT)
                sweeps[arm][seed] = trial_rows(run_dir)
                print(f"[bench_compress]   {wall[arm][seed]:.0f} s", flush=True)
        all_pts = [points(rows) for arm in arms for rows in sweeps[arm].values()]
        reference = [0.0, 1.1 * max(float(p[:, 1].max()) for p in all_pts if len(p))]
        per: dict[str, Any] = {}
        for arm in arms:
            runs = {seed: {**summarize_sweep(points(rows), reference), "wall_s": wall[arm][seed]}
                    for seed, rows in sweeps[arm].items()}
            per[arm] = {
                "runs": runs,
                "median_hypervolume": _median([r["hypervolume"] for r in runs.values()]),
                "median_fastest_within_1pt_ms": _median([r["fastest_within_1pt"]["latency_ms"] for r in runs.values()]),
                "median_best_accuracy": _median([r["fastest_within_1pt"]["best_accuracy"] for r in runs.values()]),
            }
        qat = [q for rows in sweeps["all"].values() for q in qat_rows(rows)]
        front_qat = [q for q in qat if q["on_front"]]
        report["datasets"][name] = {
            "reference": reference,
            **per,
            "hypervolume_ratio_all_over_base": per["all"]["median_hypervolume"] / per["base"]["median_hypervolume"],
            "fastest_within_1pt_ratio_all_over_base": (
                per["all"]["median_fastest_within_1pt_ms"] / per["base"]["median_fastest_within_1pt_ms"]
            ),
            "qat": {
                "trials": qat,
                "median_gap_ptq_to_fp32_pts": _median([100 * (q["fp32"] - q["ptq"]) for q in qat]),
                "median_gap_qat_to_fp32_pts": _median([100 * (q["fp32"] - q["qat"]) for q in qat]),
                "front_within_half_point": f"{sum(q['fp32'] - q['qat'] <= 0.005 for q in front_qat)}/{len(front_qat)}",
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))  # after each dataset: nothing measured is lost
        d = report["datasets"][name]
        print(f"[bench_compress] {name}: HV all/base {d['hypervolume_ratio_all_over_base']:.3f}, "
              f"fastest within 1 pt all/base {d['fastest_within_1pt_ratio_all_over_base']:.3f}")
    print(f"[bench_compress] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
