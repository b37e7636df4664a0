"""What each compression knob does on its own, candidate by candidate: QAT vs PTQ, low-rank, distillation.

    .venv/bin/python -m hwnas.scripts.bench_knobs [--out results/bench/knobs.json] [--archs 5] [--epochs 4] \
        [--photos /path/to/image_folder] [--repeats 3] [-- hwnas overrides ...]

Every figure comes from the sweep's own `PipelineEvaluator` (built from the default config plus the
overrides, as `hwnas` builds it), so a file here is made and scored exactly as in a trial: accuracy of the
ONNX file with ONNX Runtime on the val split, latency with the default target's protocol on this machine.
Per dataset (digits; with --photos an RGB image folder read at 32x32):

1. QAT vs PTQ: `--archs` architectures drawn from the space (seeded), each as an int8 candidate evaluated with
   `compression.qat_epochs=2`: the trial reports its fp32 twin's accuracy, the PTQ file's and the QAT file's.
   Target: QAT within 0.5 point of fp32. (QAT's epochs run at a tenth of the learning rate, after training.)
2. Low-rank: the space's largest layer types (plain k x k convolutions at the widest width, k = 3 and 5, and
   inverted residuals whose 1x1 convolutions factorize) at rank ratios 1.0 / 0.5 / 0.25 in every stage; the
   three files are then timed again `--repeats` times in rotation (a drift in load hits all alike) and the
   speed-up is the ratio of medians. Factorized networks are fine-tuned (evaluator.finetune_epochs), so the
   accuracy is also compared with the unfactorized network trained that many epochs longer (the control).
3. Distillation: `--archs` small fp32 architectures, trained with and without a teacher (the space's largest
   network trained once, `compression.distill.teacher=train`, T=4, weight 0.7), same seed and epochs: the
   accuracy gain at equal latency (same architecture; both files timed to show it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hwnas.scripts.sweep_run import machine, split_overrides

ROOT = Path.cwd()
RATIOS = (1.0, 0.5, 0.25)


def build(overrides: Sequence[str], cache: Path) -> Any:
    """The evaluator `hwnas` would build with these overrides, its data prepared (decoded once into `cache`)."""
    from hwnas.search.experiment import build_experiment
    from hwnas.search.launch import compose, prepare_data, prepare_teacher

    cfg = compose([f"run_dir={cache / 'run'}", "tracking.enabled=false", *overrides])
    built = build_experiment(cfg)
    built.data = prepare_data(built, cache / "data")
    prepare_teacher(built, cache / "data")
    return built.sweep.evaluator


def evaluate(evaluator: Any, candidate: dict[str, Any], folder: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = evaluator.evaluate(candidate, folder)
    keep = ("val_accuracy", "float_val_accuracy", "ptq_val_accuracy", "latency_ms", "params", "macs",
            "lowrank_layers", "train_s", "qat_s", "factorize_s", "finetune_s")
    return {"candidate": candidate, **{k: result.metrics[k] for k in keep if k in result.metrics},
            "artifact": result.artifact, "wall_s": time.perf_counter() - start}


def retime(evaluator: Any, files: Sequence[str], repeats: int) -> list[float]:
    """Median of `repeats` fresh measurements per file, taken in rotation."""
    times: dict[str, list[float]] = {f: [] for f in files}
    for _ in range(repeats):
        for f in files:
            times[f].append(float(evaluator.measure_fresh(f)["median_ms"]))
    return [statistics.median(times[f]) for f in files]


def qat_vs_ptq(common: list[str], cache: Path, archs: int, seed: int) -> dict[str, Any]:
    ev = build([*common, "compression.qat_epochs=2"], cache)
    rows = []
    for i, (name, arch) in enumerate(ev.space.random_architectures(archs, seed)):
        print(f"[bench_knobs] qat {i + 1}/{archs} {name}", flush=True)
        row = evaluate(ev, {**arch, "quant": "int8"}, cache / f"qat{i}")
        rows.append({"arch": name, **{k: row[k] for k in ("float_val_accuracy", "ptq_val_accuracy", "val_accuracy",
                                                           "latency_ms", "qat_s")}})
    gaps_ptq = [100 * (r["float_val_accuracy"] - r["ptq_val_accuracy"]) for r in rows]
    gaps_qat = [100 * (r["float_val_accuracy"] - r["val_accuracy"]) for r in rows]
    return {
        "qat_epochs": 2, "int8_full_range": bool(ev.latency.int8_full_range), "rows": rows,
        "median_gap_ptq_pts": statistics.median(gaps_ptq), "median_gap_qat_pts": statistics.median(gaps_qat),
        "max_gap_qat_pts": max(gaps_qat), "within_half_point": f"{sum(g <= 0.5 for g in gaps_qat)}/{len(rows)}",
    }


def low_rank(common: list[str], cache: Path, repeats: int, epochs: int) -> dict[str, Any]:
    ev = build([*common, "space.rank_ratios=[1.0,0.5,0.25]", "space.n_stages=[3]", "space.depths=[2]",
                "space.widths=[96]", "space.kernels=[3,5]", "space.blocks=[conv,ir]", "space.expansions=[3]"], cache)
    layer_types = {"conv_k5_w96": ("conv", 5), "conv_k3_w96": ("conv", 3), "ir3_k3_w96": ("ir3", 3)}
    out: dict[str, Any] = {}
    for label, (block, kernel) in layer_types.items():
        arch = {"n_stages": 3}
        for k in (1, 2, 3):
            arch.update({f"stage{k}.depth": 2, f"stage{k}.width": 96, f"stage{k}.kernel": kernel, f"stage{k}.block": block})
        rows = []
        for ratio in RATIOS:
            print(f"[bench_knobs] low-rank {label} ratio {ratio}", flush=True)
            cand = {**arch, "prune_ratio": 0.0, "quant": "fp32", **{f"stage{k}.rank_ratio": ratio for k in (1, 2, 3)}}
            rows.append({"rank_ratio": ratio, **evaluate(ev, cand, cache / f"lr-{label}-{ratio}")})
        # Control: the unfactorized network trained as many epochs more as the factorized ones are fine-tuned,
        # so that an accuracy change is the factorization's, not the extra training's.
        longer = build([*common, f"evaluator.epochs={epochs + ev.finetune_epochs}", "space.rank_ratios=[1.0,0.5,0.25]",
                        "space.n_stages=[3]", "space.depths=[2]", "space.widths=[96]", "space.kernels=[3,5]",
                        "space.blocks=[conv,ir]", "space.expansions=[3]"], cache)
        control = evaluate(longer, {**arch, "prune_ratio": 0.0, "quant": "fp32",
                                    **{f"stage{k}.rank_ratio": 1.0 for k in (1, 2, 3)}}, cache / f"lr-{label}-ctl")
        medians = retime(ev, [r["artifact"] for r in rows], repeats)
        for r, ms in zip(rows, medians, strict=True):
            r["retimed_ms"] = ms
            r["speedup"] = medians[0] / ms
            r["accuracy_change_pts"] = 100 * (r["val_accuracy"] - rows[0]["val_accuracy"])
            r["accuracy_vs_equal_epochs_pts"] = 100 * (r["val_accuracy"] - control["val_accuracy"])
            del r["artifact"], r["candidate"]
        out[label] = {"rows": rows, "control_equal_epochs_accuracy": control["val_accuracy"]}
    return out


def distillation(common: list[str], cache: Path, archs: int, seed: int, repeats: int) -> dict[str, Any]:
    small = ["space.n_stages=[2]", "space.widths=[8,16]", "space.depths=[1]"]
    plain = build([*common, *small], cache)
    teach = build([*common, *small, "compression.distill.teacher=train", "compression.distill.temperature=4.0",
                   "compression.distill.weight=0.7", "space.n_stages=[2,3]", "space.widths=[8,16,64]",
                   "space.depths=[1,2]"], cache)
    info = teach.teacher_info
    rows = []
    for i, (name, arch) in enumerate(plain.space.random_architectures(archs, seed)):
        print(f"[bench_knobs] distill {i + 1}/{archs} {name}", flush=True)
        cand = {**arch, "quant": "fp32"}
        a = evaluate(plain, cand, cache / f"plain{i}")
        b = evaluate(teach, cand, cache / f"kd{i}")
        ms = retime(plain, [a["artifact"], b["artifact"]], repeats)
        rows.append({"arch": name, "plain_accuracy": a["val_accuracy"], "distilled_accuracy": b["val_accuracy"],
                     "gain_pts": 100 * (b["val_accuracy"] - a["val_accuracy"]), "plain_ms": ms[0], "distilled_ms": ms[1]})
    return {"teacher": info, "temperature": 4.0, "weight": 0.7, "rows": rows,
            "median_gain_pts": statistics.median(r["gain_pts"] for r in rows)}


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/knobs.json")
    parser.add_argument("--archs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--only", default="qat,lowrank,distill")
    args = parser.parse_args(own)
    datasets: dict[str, list[str]] = {"digits": ["dataset=digits"]}
    if args.photos is not None:
        datasets["photos32"] = ["dataset=image_folder", f"dataset.path={args.photos.resolve()}", "dataset.resolution=32"]
    only = set(args.only.split(","))
    report: dict[str, Any] = {
        "command": " ".join(["python -m hwnas.scripts.bench_knobs", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "epochs": args.epochs, "archs": args.archs, "seed": args.seed, "datasets": {},
    }
    for name, data in datasets.items():
        common = [*data, f"seed={args.seed}", f"evaluator.epochs={args.epochs}", *extra]
        section: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="hwnas-bench-knobs-") as tmp:
            cache = Path(tmp)
            if "qat" in only:
                section["qat_vs_ptq"] = qat_vs_ptq(common, cache, args.archs, args.seed)
            if "lowrank" in only:
                section["low_rank"] = low_rank(common, cache, args.repeats, args.epochs)
            if "distill" in only:
                section["distillation"] = distillation(common, cache, args.archs, args.seed, args.repeats)
        report["datasets"][name] = section
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))  # after each dataset: nothing is lost
    print(f"[bench_knobs] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
