"""Can a sweep's latencies be trusted? Re-measure a concurrent sweep's models afterwards, on an idle machine.

    .venv/bin/python -m hwnas.scripts.bench_fidelity [--out results/bench/fidelity.json] [--trials 16] \
        [--repeats 10] [--also-unisolated] [-- hwnas overrides ...]

1. Runs the default search as `make search` does (a subprocess) with 2 concurrent trials, the cache off
   (every trial is timed inside the sweep, while the other trial trains) and MLflow off.
2. Afterwards, with nothing else running, times every trial's model.onnx again `--repeats` times with
   the sweep's own target (rebuilt from its config.yaml: same protocol, same isolation).
3. Reports fidelity (Spearman rank correlation and median absolute relative error of the sweep's
   latency_ms against the idle median) and repeatability (per file, the CV of the `--repeats` idle
   medians), with the smallest relative difference two files must differ by to be ranked reliably
   (2 x sqrt(2) x the median CV: two independent measurements, ~95%).
`--also-unisolated` repeats 1-3 with `hardware.isolate=false` (timing while the other trial computes):
the same figures without the measurement lock, for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from hwnas.scripts.sweep_run import machine, run_search, split_overrides, trial_rows

ROOT = Path.cwd()
TARGETS = {"spearman": 0.95, "median_abs_err": 0.10, "cv_of_median": 0.02}


def fidelity(recorded_ms: Sequence[float], idle_ms: Sequence[float]) -> dict[str, float]:
    """Rank correlation and relative errors of recorded against idle re-measurements (pure)."""
    rec, idle = np.asarray(recorded_ms, float), np.asarray(idle_ms, float)
    if rec.shape != idle.shape or len(rec) < 3:
        raise ValueError(f"recorded/idle: {len(rec)}/{len(idle)} values; allowed: equal lengths >= 3")
    rel = np.abs(rec - idle) / idle
    rho = spearmanr(rec, idle).statistic
    return {"spearman": float(rho), "median_abs_err": float(np.median(rel)), "max_abs_err": float(rel.max()),
            "n": int(len(rec))}


def _remeasure(run_dir: Path, repeats: int) -> list[dict[str, Any]]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hwnas.evaluators.measure.base import target_config

    cfg = OmegaConf.load(run_dir / "config.yaml")
    target = instantiate(OmegaConf.create(target_config(cfg.hardware)))
    rows = trial_rows(run_dir)
    out = []
    for row in rows:
        if row["status"] != "COMPLETE":
            continue
        again = [target.measure(row["artifact"]) for _ in range(repeats)]
        medians = [m.median_ms for m in again]
        out.append({"number": row["number"], "quant": row["candidate"].get("quant"),
                    "recorded_ms": row["metrics"]["latency_ms"], "idle_ms": float(np.median(medians)),
                    "recorded_others_share": row["metrics"].get("latency_others_share"),
                    "recorded_disturbed": row["metrics"].get("latency_disturbed"),
                    "recorded_rounds": row["metrics"].get("latency_rounds"),
                    "idle_disturbed": sum(m.disturbed for m in again),
                    "idle_medians_ms": medians, "cv_of_median": float(np.std(medians, ddof=1) / np.mean(medians))})
    return out


def _case(name: str, trials: int, repeats: int, overrides: Sequence[str]) -> dict[str, Any]:
    run_dir = ROOT / "results" / "bench" / "fidelity_runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    wall = run_search(run_dir, trials, ["hardware.cache=null", *overrides], ROOT)
    load_after_sweep = os.getloadavg()
    time.sleep(20)  # let the sweep's processes go before the idle re-measurement
    load_idle = os.getloadavg()
    files = _remeasure(run_dir, repeats)
    cvs = np.asarray([f["cv_of_median"] for f in files])
    return {
        "run_dir": str(run_dir.relative_to(ROOT)), "sweep_wall_s": wall, "overrides": list(overrides),
        "fidelity": fidelity([f["recorded_ms"] for f in files], [f["idle_ms"] for f in files]),
        "repeatability": {"median_cv": float(np.median(cvs)), "max_cv": float(cvs.max()),
                          "share_cv_le_2pct": float(np.mean(cvs <= 0.02)),
                          "resolvable_difference": float(2 * np.sqrt(2) * np.median(cvs))},
        "latency_range_ms": [min(f["idle_ms"] for f in files), max(f["idle_ms"] for f in files)],
        "recorded_disturbed": sum(bool(f["recorded_disturbed"]) for f in files),
        "loadavg_after_sweep": load_after_sweep, "loadavg_before_remeasure": load_idle, "files": files,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "fidelity.json")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--also-unisolated", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "command": "python -m hwnas.scripts.bench_fidelity " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "targets": TARGETS,
        "isolated": _case("isolated", args.trials, args.repeats, extra),
    }
    if args.also_unisolated:
        result["unisolated"] = _case("unisolated", args.trials, args.repeats, [*extra, "hardware.isolate=false"])
    iso = result["isolated"]
    result["met"] = {
        "spearman": iso["fidelity"]["spearman"] >= TARGETS["spearman"],
        "median_abs_err": iso["fidelity"]["median_abs_err"] <= TARGETS["median_abs_err"],
        "cv_of_median": iso["repeatability"]["median_cv"] <= TARGETS["cv_of_median"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in ("isolated", "unisolated"):
        if name in result:
            c = result[name]
            print(f"{name}: spearman {c['fidelity']['spearman']:.3f}, median |err| {c['fidelity']['median_abs_err']:.1%}, "
                  f"median CV {c['repeatability']['median_cv']:.2%} (max {c['repeatability']['max_cv']:.2%}), "
                  f"resolves {c['repeatability']['resolvable_difference']:.1%}, n={c['fidelity']['n']}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
