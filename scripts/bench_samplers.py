"""What does each sampler cost the driver per trial (ask + suggest + tell) as a study grows to 1,000 trials?

    .venv/bin/python -m hwnas.scripts.bench_samplers [--trials 1000] [--window 100] [--samplers tpe nsga2 ...] \
        [--gp-trials 300] [--spaces nb201 macro_cnn] [--out results/bench/samplers.json]

Each sampler (built from conf/search/<name>.yaml exactly as `hwnas search=<name>` builds it) runs
one study per space through the runner's own ask/tell loop (`search.runners.local_runner.run_in_process`,
duplicate proposals answered from the record as in a sweep). The objectives cost nothing: two numbers
derived from the candidate's arch_id, so only the sampler's work is timed. Reported per sampler and
space: the median and 90th percentile of the per-trial time over the last `--window` trials before
each checkpoint (100, 250, 500, 1,000 trials), and the share of proposals that were duplicates.
`gp` is timed up to `--gp-trials` (it costs seconds a trial well before 1,000).

The target (issue 3): under 50 ms per trial at 1,000 trials for tpe, nsga2, evolution, rl, random.
Writes `--out` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from hwnas.evaluators.base import Evaluation  # noqa: E402
from hwnas.search.broker import Broker  # noqa: E402
from hwnas.search.config import CONF_DIR, compose_config, validate  # noqa: E402
from hwnas.search.objectives import Objectives  # noqa: E402
from hwnas.search.runners.local_runner import run_in_process  # noqa: E402
from hwnas.spaces.candidate import arch_id  # noqa: E402

TARGET_MS = 50.0
TARGET_SAMPLERS = ("tpe", "nsga2", "evolution", "rl", "random")
CHECKPOINTS = (100, 250, 500, 1000)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = sorted(f.stem for f in (CONF_DIR / "search").glob("*.yaml"))
    p.add_argument("--samplers", nargs="+", default=[*TARGET_SAMPLERS, "gp"], choices=choices)
    p.add_argument("--spaces", nargs="+", default=["nb201", "macro_cnn"], choices=["nb201", "macro_cnn"])
    p.add_argument("--trials", type=int, default=1000, help="evaluations per study")
    p.add_argument("--gp-trials", type=int, default=300, help="evaluations per gp study")
    p.add_argument("--window", type=int, default=100, help="trials before each checkpoint that are timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/bench/samplers.json"))
    args = p.parse_args(argv)
    for flag in ("trials", "gp_trials", "window"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: allowed: an integer >= 1")
    return args


def free_objectives(candidate: dict[str, Any]) -> list[float]:
    """Two numbers fixed by the candidate (accuracy-like to maximise, latency-like to minimise), at no cost."""
    rng = np.random.default_rng(int(arch_id(candidate), 16))
    latency = float(rng.uniform(0.1, 5.0))
    return [float(np.clip(60 + 8 * np.log(latency) + rng.normal(0, 3), 0, 100)), latency]


def window_stats(seconds: np.ndarray, end: int, window: int) -> dict[str, float] | None:
    """Median and p90 (ms) of the per-trial times of trials end-window+1 .. end, or None if the study is shorter."""
    if end > len(seconds):
        return None
    part = seconds[max(0, end - window) : end] * 1e3
    return {"median_ms": float(np.median(part)), "p90_ms": float(np.percentile(part, 90))}


def time_study(sampler_name: str, space_name: str, n_trials: int, seed: int, window: int) -> dict[str, Any]:
    cfg = compose_config([f"search={sampler_name}", f"space={space_name}", f"seed={seed}"])
    validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = instantiate(cfg.search)
    space = instantiate(cfg.space)
    objectives = Objectives(names=("accuracy", "latency"), modes=("max", "min"))
    study = optuna.create_study(sampler=sampler, directions=objectives.optuna_directions)
    broker = Broker(study, space, objectives, n_trials)
    stamps: list[float] = []

    def evaluate(number: int, candidate: dict[str, Any]) -> Evaluation:
        stamps.append(time.perf_counter())  # one stamp per evaluation: the sampler's work since the last
        return Evaluation(dict(zip(objectives.names, free_objectives(candidate), strict=True)))

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_in_process(broker, evaluate)
    # Time between consecutive evaluations = tell of the last + asks (duplicates included) + suggest.
    seconds = np.diff(np.r_[start, np.array(stamps)])
    return {
        "trials": len(stamps),
        "duplicates": broker.duplicates,
        "total_s": float(time.perf_counter() - start),
        "per_trial": {str(c): window_stats(seconds, c, window) for c in (*CHECKPOINTS, len(stamps)) if c <= len(stamps)},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the hwnas driver runs (GP fits single-threaded)
    results: dict[str, dict[str, Any]] = {}
    for space_name in args.spaces:
        for name in args.samplers:
            n = args.gp_trials if name == "gp" else args.trials
            result = time_study(name, space_name, n, args.seed, args.window)
            results.setdefault(name, {})[space_name] = result
            last = result["per_trial"][str(result["trials"])]
            print(
                f"{name:<10} {space_name:<10} {result['trials']:>5} trials in {result['total_s']:7.1f} s; "
                f"last {args.window}: median {last['median_ms']:7.2f} ms, p90 {last['p90_ms']:7.2f} ms; "
                f"{result['duplicates']} duplicate proposals",
                flush=True,
            )
    checks = {}
    for name in TARGET_SAMPLERS:
        for space_name, result in results.get(name, {}).items():
            at = result["per_trial"].get(str(args.trials))
            if at is not None:
                checks[f"{name}/{space_name}: median ms per trial at {args.trials} < {TARGET_MS:g}"] = at["median_ms"] < TARGET_MS
    report = {
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "libraries": {"optuna": optuna.__version__},
        "settings": {"trials": args.trials, "gp_trials": args.gp_trials, "window": args.window, "seed": args.seed},
        "method": __doc__,
        "results": results,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(checks, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
