"""What does multi-objective early stopping save, and what does it cost in front quality? And latency-first?

    .venv/bin/python -m hwnas.scripts.bench_moasha [--out results/bench/moasha.json] [--trials 20] \
        [--seeds 0,1,2] [--photos /path/to/image_folder] [--budget-ms X] [--skip-latency-first] \
        [--moasha-override scheduler.reduction_factor=4 ...] [--equal-compute-trials N] [--reuse DIR [--reuse-arms full,...]] \
        [-- hwnas overrides ...]

MO-ASHA vs full training. For each dataset (scikit-learn's digits; with --photos also an RGB image folder read at
32x32, e.g. one made by `python -m hwnas.scripts.make_photo_folder`) and each seed, two sweeps of the default
space with the same number of trials, run as `make search` runs (a subprocess, Ray, 2 trials at a time, MLflow
off): `scheduler=full` and `scheduler=moasha` (its shipped rungs and reduction factor unless overridden after
`--`). Per sweep: training epochs (stopped trials count the epochs they ran; `train_epochs` of finished ones),
the same plus fine-tuning epochs (a pruned candidate's `evaluator.finetune_epochs`, paid only by trials that
finish), trials stopped per rung, wall time, and the hypervolume of the (val accuracy, latency) front against
one reference per dataset (accuracy 0, 1.1 x the slowest latency any sweep of that dataset measured; stopped
trials are never on a front). Per dataset: the epoch ratio moasha / full over all seeds and the hypervolume
ratio per seed and its median. With --equal-compute-trials N a third arm runs moasha with N trials (choose N so
its epochs are about full training's): the front MO-ASHA finds for the same compute. --reuse DIR reads the
finished sweeps of an earlier run (same name, same trial count) instead of running them again.

Latency first (digits, seed 0): the same budgeted sweep twice, `scheduler.latency_first=true` and `false`; the
budget is --budget-ms, or the median latency the seed-0 full-training digits sweep measured (so about half of
the space is over it). Reports the share of candidates rejected before training, what rejecting them cost
(`early_s`: build + export + measure of the untrained file), what a trained over-budget candidate cost in the
`false` sweep (`total_s`), the seconds that saves, and both sweeps' wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hwnas.scripts.bench_compress import DIRECTIONS, points
from hwnas.scripts.sweep_run import machine, run_search, split_overrides, trial_rows
from hwnas.search.pareto import hypervolume, non_dominated_mask
from hwnas.search.schedulers.accounting import schedule_summary
from hwnas.search.trial_log import COMPLETE, REJECTED

ROOT = Path.cwd()
TARGET_EPOCH_RATIO = 1 / 3
TARGET_HV_RATIO = 0.98
FINETUNE_EPOCHS = 2  # conf/evaluator/pipeline.yaml's finetune_epochs (the benchmark does not override it)


def finetuned(row: Mapping[str, Any]) -> bool:
    """Whether a finished trial paid fine-tuning: pruned, or a low-rank factor below 1 (pure)."""
    cand = row.get("candidate") or {}
    factorized = any(k.endswith(".rank_ratio") and float(v) < 1.0 for k, v in cand.items())
    return row.get("status") == COMPLETE and (float(cand.get("prune_ratio") or 0.0) > 0 or factorized)


def sweep_figures(rows: Sequence[Mapping[str, Any]], reference: Sequence[float], wall_s: float) -> dict[str, Any]:
    """One sweep's epochs, stops, hypervolume and front (pure over its records)."""
    s = schedule_summary(rows)
    pts = points(rows)
    front = pts[non_dominated_mask(pts, DIRECTIONS)] if len(pts) else pts
    tuned = sum(finetuned(r) for r in rows)
    return {
        "trials": len(rows),
        "complete": sum(r.get("status") == COMPLETE for r in rows),
        "train_epochs": s["epochs"],
        "train_epochs_if_full": s["epochs_full"],
        "finetune_epochs": tuned * FINETUNE_EPOCHS,
        "epochs_incl_finetune": s["epochs"] + tuned * FINETUNE_EPOCHS,
        "stopped_per_rung": {str(k): v for k, v in s["stopped"].items()},
        "hypervolume": hypervolume(pts, DIRECTIONS, reference) if len(pts) else 0.0,
        "front": sorted(map(list, front.tolist()), key=lambda p: p[1]),
        "best_accuracy": float(pts[:, 0].max()) if len(pts) else None,
        # Finished trials whose trained file had the untrained file's graph (its early latency is the latency),
        # and the gaps (%) of those measured again because it did not.
        "early_latency_reused": sum(r.get("status") == COMPLETE and r["metrics"].get("latency_early") == 1.0 for r in rows),
        "early_latency_gaps_pct": [r["metrics"]["latency_early_gap_pct"] for r in rows
                                   if r.get("status") == COMPLETE and "latency_early_gap_pct" in r["metrics"]],
        "wall_s": wall_s,
    }


def latency_first_figures(on: Sequence[Mapping[str, Any]], off: Sequence[Mapping[str, Any]], budget_ms: float,
                          wall: Mapping[str, float]) -> dict[str, Any]:
    """Share rejected before training and the seconds that saved (pure over the two sweeps' records)."""
    rejected = [r for r in on if r.get("status") == REJECTED]
    over_off = [r for r in off if r.get("status") == COMPLETE and r["metrics"].get("latency_ms", 0.0) > budget_ms]
    # What a rejection cost inside the trial: data, build, and the untrained file's export + measurement.
    early_s = [sum(float(r["metrics"].get(k, 0.0)) for k in ("data_s", "build_s", "early_s")) for r in rejected]
    span_s = [float(r["finished_at"]) - float(r["started_at"]) for r in rejected if r.get("started_at")]
    trained_over_s = [float(r["metrics"]["total_s"]) for r in over_off]
    median_trained = statistics.median(trained_over_s) if trained_over_s else None
    saved = (sum(median_trained - e for e in early_s)) if median_trained is not None else None
    return {
        "budget_ms": budget_ms,
        "trials": len(on),
        "rejected": len(rejected),
        "rejected_share": len(rejected) / len(on) if on else 0.0,
        "rejected_cost_s_median": statistics.median(early_s) if early_s else None,
        "rejected_cost_how": "data_s + build_s + early_s of the rejected trial (rows before these were recorded: 0)",
        "rejected_span_s_median": statistics.median(span_s) if span_s else None,
        "rejected_span_how": "started_at to finished_at of the rejected trial's record: worker start-up included",
        "off_over_budget_trained": len(over_off),
        "off_over_budget_total_s_median": median_trained,
        "seconds_saved_estimate": saved,
        "seconds_saved_how": "sum over rejected candidates of (median total_s of an over-budget candidate trained "
                             "in the latency_first=false sweep - the rejected candidate's cost)",
        "wall_s": dict(wall),
        "wall_saved_s": wall["off"] - wall["on"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/moasha.json")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--photos", type=Path, default=None, help="an RGB image folder (read at 32x32)")
    parser.add_argument("--budget-ms", type=float, default=None)
    parser.add_argument("--skip-latency-first", action="store_true")
    parser.add_argument("--moasha-override", action="append", default=[],
                        help="an override for the moasha arms only (e.g. scheduler.reduction_factor=4); repeatable")
    parser.add_argument("--equal-compute-trials", type=int, default=None,
                        help="also run moasha with this many trials (about full training's epochs): the front at equal compute")
    parser.add_argument("--reuse", type=Path, action="append", default=[],
                        help="an earlier run's moasha_runs/<stamp>: its finished sweeps (same name, same trials) are read, "
                             "not run; repeatable (the first that holds a sweep is read)")
    parser.add_argument("--reuse-arms", default="full,moasha,moasha_equal_compute,latency_first",
                        help="the arms --reuse may read (e.g. full,latency_first after a change to MO-ASHA itself)")
    args = parser.parse_args(own)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = ROOT / "results/bench/moasha_runs" / time.strftime("%Y%m%d-%H%M%S")
    datasets: dict[str, list[str]] = {"digits": ["dataset=digits"]}
    if args.photos is not None:
        if not args.photos.is_dir():
            raise SystemExit(f"--photos: {str(args.photos)!r} is not a folder; allowed: an image folder (class/<files>)")
        datasets["photos32"] = ["dataset=image_folder", f"dataset.path={args.photos.resolve()}", "dataset.resolution=32"]
    moasha = ["scheduler=moasha", *args.moasha_override]
    arms: dict[str, tuple[list[str], int]] = {"full": (["scheduler=full"], args.trials), "moasha": (moasha, args.trials)}
    if args.equal_compute_trials:
        arms["moasha_equal_compute"] = (moasha, args.equal_compute_trials)
    reused: list[str] = []
    report: dict[str, Any] = {
        "command": " ".join(["python -m hwnas.scripts.bench_moasha", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "trials": args.trials, "seeds": seeds,
        "arms": {a: {"overrides": o, "trials": t} for a, (o, t) in arms.items()}, "extra_overrides": extra,
        "targets": {"epoch_ratio_max": TARGET_EPOCH_RATIO, "hypervolume_ratio_min": TARGET_HV_RATIO},
        "datasets": {}, "reused_sweeps": reused,  # their wall_s: first trial start to last trial end
    }

    def sweep(run_dir: Path, trials: int, overrides: list[str], arm: str) -> tuple[float, list[dict[str, Any]]]:
        for earlier in (d / run_dir.name for d in args.reuse if arm in args.reuse_arms.split(",")):
            if (earlier / "trials.jsonl").is_file() and len(trial_rows(earlier)) == trials:
                rows = trial_rows(earlier)
                reused.append(str(earlier))
                return max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows), rows
        return run_search(run_dir, trials, overrides, ROOT), trial_rows(run_dir)

    def save() -> None:  # after every step: nothing measured is lost
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    full_latencies: list[float] = []
    for name, data_overrides in datasets.items():
        rows: dict[str, dict[int, list[dict[str, Any]]]] = {arm: {} for arm in arms}
        wall: dict[str, dict[int, float]] = {arm: {} for arm in arms}
        for seed in seeds:
            for arm, (arm_overrides, trials) in arms.items():
                run_dir = work / f"{name}-{arm}-s{seed}"
                print(f"[bench_moasha] {name} {arm} seed {seed} ...", flush=True)
                wall[arm][seed], rows[arm][seed] = sweep(run_dir, trials, [*data_overrides, f"seed={seed}",
                                                                           *arm_overrides, *extra], arm)
                print(f"[bench_moasha]   {wall[arm][seed]:.0f} s, {schedule_summary(rows[arm][seed])}", flush=True)
        all_pts = [points(r) for arm in arms for r in rows[arm].values()]
        reference = [0.0, 1.1 * max(float(p[:, 1].max()) for p in all_pts if len(p))]
        per = {arm: {seed: sweep_figures(rows[arm][seed], reference, wall[arm][seed]) for seed in seeds} for arm in arms}
        if name == "digits":
            full_latencies = [float(p) for p in points(rows["full"][seeds[0]])[:, 1]]
        totals = {arm: {k: sum(per[arm][s][k] for s in seeds) for k in ("train_epochs", "epochs_incl_finetune", "wall_s")}
                  for arm in arms}
        hv_ratios = {str(s): _ratio(per["moasha"][s]["hypervolume"], per["full"][s]["hypervolume"]) for s in seeds}
        epoch_ratio = _ratio(totals["moasha"]["train_epochs"], totals["full"]["train_epochs"])
        hv_median = statistics.median([v for v in hv_ratios.values() if v is not None])
        equal = {}
        if "moasha_equal_compute" in arms:
            eq_hv = {str(s): _ratio(per["moasha_equal_compute"][s]["hypervolume"], per["full"][s]["hypervolume"])
                     for s in seeds}
            equal = {"equal_compute": {
                "trials": arms["moasha_equal_compute"][1],
                "epoch_ratio": _ratio(totals["moasha_equal_compute"]["train_epochs"], totals["full"]["train_epochs"]),
                "hypervolume_ratio_per_seed": eq_hv,
                "hypervolume_ratio_median": statistics.median([v for v in eq_hv.values() if v is not None]),
            }}
        report["datasets"][name] = {
            "reference": reference,
            "sweeps": {arm: {str(s): f for s, f in per[arm].items()} for arm in arms},
            "totals": totals,
            "epoch_ratio_moasha_over_full": epoch_ratio,
            "epoch_ratio_incl_finetune": _ratio(totals["moasha"]["epochs_incl_finetune"],
                                                totals["full"]["epochs_incl_finetune"]),
            "wall_ratio": _ratio(totals["moasha"]["wall_s"], totals["full"]["wall_s"]),
            "hypervolume_ratio_per_seed": hv_ratios,
            "hypervolume_ratio_median": hv_median,
            "met": {"epochs": epoch_ratio is not None and epoch_ratio <= TARGET_EPOCH_RATIO,
                    "hypervolume": hv_median >= TARGET_HV_RATIO},
            **equal,
            "run_dirs": str(work),
        }
        save()
        d = report["datasets"][name]
        print(f"[bench_moasha] {name}: epochs moasha/full {epoch_ratio:.3f} (incl. fine-tune "
              f"{d['epoch_ratio_incl_finetune']:.3f}), HV ratio median {hv_median:.3f} per seed {hv_ratios}", flush=True)

    if not args.skip_latency_first:
        budget = args.budget_ms if args.budget_ms is not None else statistics.median(full_latencies)
        lf_rows: dict[str, list[dict[str, Any]]] = {}
        lf_wall: dict[str, float] = {}
        for arm, flag in (("on", "true"), ("off", "false")):
            run_dir = work / f"latency_first-{arm}"
            print(f"[bench_moasha] latency-first {arm}, budget {budget:.4f} ms ...", flush=True)
            lf_wall[arm], lf_rows[arm] = sweep(run_dir, args.trials, [
                "dataset=digits", f"seed={seeds[0]}", "scheduler=full", f"scheduler.latency_first={flag}",
                f"objective.latency_budget_ms={budget}", *extra], "latency_first")
        report["latency_first"] = {
            "budget_from": "--budget-ms" if args.budget_ms is not None else "median latency of the seed-0 full digits sweep",
            **latency_first_figures(lf_rows["on"], lf_rows["off"], budget, lf_wall),
        }
        report["machine"]["loadavg_end"] = list(os.getloadavg())
        save()
        print(f"[bench_moasha] latency first: {report['latency_first']['rejected']} of {args.trials} rejected, "
              f"~{report['latency_first']['seconds_saved_estimate']} s saved", flush=True)
    print(f"[bench_moasha] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
