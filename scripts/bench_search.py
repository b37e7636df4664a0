"""How fast does each search strategy find the accuracy-latency front? Measured on a lookup table.

    .venv/bin/python -m hwnas.scripts.bench_search --table results/nb201/nb201_latency.csv \
        --accuracy cifar10-val --latency latency_ms [--samplers tpe nsga2 evolution rl random gp] \
        [--budgets 25 50 100 200 400] [--seeds 10] [--latency-budget MS] [--out results/bench/search.json]

The true front is that of every cell of the space (conf/space/nb201.yaml, `--override` to change
it) found in the table; its hypervolume is taken against the nadir of the true front moved out by
1% of each objective's range on the front. Every (sampler, seed) runs ONE study of the largest
budget through the same ask/tell loop as `runner=local` (`search.runners.local_runner.run_in_process`,
duplicates answered from the record, not counted), samplers built from conf/search/<name>.yaml
with the seed. At each budget we report the hypervolume of the feasible front found in the first
`budget` evaluations divided by the true front's, and, with a latency budget, the regret of the
best feasible accuracy (table's best feasible - found, in the table's units). With a latency budget
the true front, its reference and hypervolume are those of the feasible cells.

Writes `--out` (JSON) and a PNG beside it (ratio against evaluations, median and IQR per sampler).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hwnas.evaluators.base import Evaluation  # noqa: E402
from hwnas.evaluators.tabular import TabularEvaluator  # noqa: E402
from hwnas.search.broker import Broker  # noqa: E402
from hwnas.search.config import CONF_DIR, compose_config, validate  # noqa: E402
from hwnas.search.objectives import Objectives  # noqa: E402
from hwnas.search.pareto import hypervolume, hypervolume_curve, nadir_reference, non_dominated_mask  # noqa: E402
from hwnas.search.plots import plot_hypervolume_curve  # noqa: E402
from hwnas.search.runners.local_runner import run_in_process  # noqa: E402
from hwnas.spaces.candidate import arch_id  # noqa: E402

DIRECTIONS = ("max", "min")  # (accuracy, latency)
TARGETS = (0.99, 0.998)
# Samplers the acceptance checks expect to beat random search at 100 evaluations.
CHALLENGERS = ("tpe", "nsga2", "evolution", "rl")
CHECK_BUDGET_EARLY, CHECK_BUDGET_LATE = 100, 400
REGRET_TOLERANCE = 0.5  # accuracy points


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True, help="CSV/Parquet with the key, accuracy and latency columns")
    p.add_argument("--key", default="arch", help="table column holding space.name(candidate)")
    p.add_argument("--accuracy", required=True, help="accuracy column (maximised), e.g. cifar10-val")
    p.add_argument("--latency", required=True, help="latency column (minimised), e.g. latency_ms")
    p.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "evolution", "rl", "random", "gp"])
    p.add_argument("--budgets", nargs="+", type=int, default=[25, 50, 100, 200, 400])
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 per sampler (10 or more for the figures)")
    p.add_argument("--latency-budget", type=float, default=None, help="ms; only cells at or under it are feasible")
    p.add_argument("--max-budget-gp", type=int, default=None, help="largest budget for gp (it costs seconds a trial)")
    p.add_argument("--seeds-gp", type=int, default=None, help="seeds for gp (default: --seeds)")
    p.add_argument(
        "--max-budget-random", type=int, default=None,
        help="run random further than the budgets, to find how many evaluations it needs to reach the targets",
    )
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every sampler, e.g. 'space.ops=[none,skip_connect]'")
    p.add_argument("--out", type=Path, default=Path("results/bench/search.json"))
    args = p.parse_args(argv)
    if args.seeds < 1 or (args.seeds_gp is not None and args.seeds_gp < 1):
        p.error("--seeds/--seeds-gp: allowed: an integer >= 1")
    if any(b < 1 for b in args.budgets):
        p.error(f"--budgets {args.budgets}: allowed: integers >= 1")
    if args.latency_budget is not None and args.latency_budget <= 0:
        p.error(f"--latency-budget {args.latency_budget}: allowed: a number > 0")
    for name in args.samplers:
        if not (CONF_DIR / "search" / f"{name}.yaml").is_file():
            choices = sorted(f.stem for f in (CONF_DIR / "search").glob("*.yaml"))
            p.error(f"--samplers {name}: unknown; allowed: {', '.join(choices)}")
    args.budgets = sorted(set(args.budgets))
    return args


def default_sampler() -> str:
    """The `search` choice of conf/config.yaml's defaults list: what `hwnas` runs when not told."""
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").defaults:
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            if "search" in entry:
                return str(entry["search"])
    raise ValueError(f"{CONF_DIR / 'config.yaml'} has no search default")


# ----------------------------------------------------------------------------- the truth


def space_points(space: Any, evaluator: TabularEvaluator, objectives: Objectives) -> tuple[np.ndarray, list[str], int]:
    """(accuracy, latency) of every cell of the space found in the table (infeasible ones as NaN),
    the cells' names in the same order, and the number of cells missing from the table."""
    decisions = space.decisions()
    names = list(decisions)
    rows, found, missing = [], [], 0
    for values in itertools.product(*(decisions[n] for n in names)):
        name = space.name(dict(zip(names, values, strict=True)))
        try:
            metrics = evaluator.lookup(name)
        except KeyError:
            missing += 1
            continue
        rows.append(point(metrics, objectives))
        found.append(name)
    return np.array(rows, dtype=float).reshape(-1, 2), found, missing


def noise_ceiling(points: np.ndarray, archs: list[str], reference: np.ndarray, true_hv: float) -> dict[str, Any]:
    """What a perfect search gets that evaluates each distinct network once, with typical training luck.

    NAS-Bench-201 trained isomorphic cells (one network, spelled differently) separately, so their
    accuracies differ by training noise alone, and the true front picks the luckiest spelling. Here
    each distinct network (NAS-Bench-201's own rule, `nb201_unique_str`) is one point: the median of
    its feasible cells' values. That front's hypervolume over the true front's is the most a search
    can expect without re-training one network, under other names, until it gets lucky.
    """
    from hwnas.spaces.nb201 import nb201_unique_str

    groups: dict[str, list[int]] = {}
    for i, arch in enumerate(archs):
        if not np.isnan(points[i]).any():
            groups.setdefault(nb201_unique_str(arch), []).append(i)
    medians = np.array([np.median(points[rows], axis=0) for rows in groups.values()], dtype=float).reshape(-1, 2)
    ratio = hypervolume(medians, list(DIRECTIONS), reference) / true_hv
    return {"networks": len(groups), "statistic": "median of each network's cells", "ratio": float(ratio)}


def point(metrics: dict[str, float], objectives: Objectives) -> list[float]:
    """The objective values, or NaN for an infeasible cell: it is never on a front and adds no volume."""
    if not objectives.is_feasible(metrics):
        return [np.nan, np.nan]
    return objectives.values(metrics)


# ----------------------------------------------------------------------------- one study


def build_sampler(name: str, overrides: Sequence[str], seed: int) -> tuple[optuna.samplers.BaseSampler, Any, dict[str, Any]]:
    """Sampler and space exactly as `hwnas search=<name> space=nb201 seed=<seed>` builds them."""
    cfg = compose_config([f"search={name}", "space=nb201", f"seed={seed}", *overrides])
    validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental/deprecation notes from Optuna, once per study
        sampler = instantiate(cfg.search)
    return sampler, instantiate(cfg.space), OmegaConf.to_container(cfg.search, resolve=True)  # type: ignore[return-value]


def run_study(
    sampler: optuna.samplers.BaseSampler, space: Any, evaluator: TabularEvaluator, objectives: Objectives, n_evaluations: int
) -> dict[str, Any]:
    """One study of `n_evaluations` distinct candidates; returns their points in order and counts."""
    points: list[list[float]] = []
    distinct: set[str] = set()

    def evaluate(number: int, candidate: dict[str, Any]) -> Evaluation:
        points.append([np.nan, np.nan])  # stays NaN if the look-up fails (a cell missing from the table)
        # Fewer distinct than evaluations: the sampler kept repeating itself until the runner gave in.
        distinct.add(arch_id(candidate))
        result = evaluator.evaluate(candidate, Path("."))
        points[-1] = point(result.metrics, objectives)
        return result  # as in a sweep: a latency budget is told to the sampler as a constraint

    study = optuna.create_study(sampler=sampler, directions=objectives.optuna_directions)
    broker = Broker(study, space, objectives, n_evaluations)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = run_in_process(broker, evaluate)
    seconds = time.perf_counter() - start
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.get_trials(deepcopy=False))
    return {
        "points": np.array(points, dtype=float).reshape(-1, 2),
        "evaluations": done,
        "duplicates": broker.duplicates,
        "distinct": len(distinct),
        "missing": failed,
        "seconds": seconds,
    }


def run_figures(
    points: np.ndarray, budgets: Sequence[int], reference: np.ndarray, true_hv: float, best_feasible: float | None
) -> dict[str, Any]:
    """Hypervolume ratio (and regret) at each budget, and evaluations to reach each target."""
    curve = hypervolume_curve(points, list(DIRECTIONS), reference) / true_hv
    n = len(curve)
    out: dict[str, Any] = {
        "ratio": {str(b): float(curve[b - 1]) for b in budgets if b <= n},
        "evals_to": {str(t): first_reach(curve, t) for t in TARGETS},
    }
    if best_feasible is not None:
        # NaN marks infeasible (or missing) rows; fmax.accumulate carries the best feasible so far.
        running = np.fmax.accumulate(points[:, 0])
        # Rounded: accuracies come with a few decimals, and the float difference should not show noise.
        out["regret"] = {
            str(b): None if np.isnan(running[b - 1]) else round(float(best_feasible - running[b - 1]), 9) for b in budgets if b <= n
        }
    out["curve"] = curve
    return out


def first_reach(curve: np.ndarray, target: float) -> int | None:
    hits = np.flatnonzero(curve >= target)
    return int(hits[0]) + 1 if len(hits) else None


# ----------------------------------------------------------------------------- summaries


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, quartiles, min, max over runs; None (not reached / none feasible) counts as +inf."""
    arr = np.array([np.inf if v is None else v for v in values], dtype=float)
    if len(arr) == 0:
        return {"n": 0}
    # With an inf, interpolating would give inf - inf = NaN: take the lower order statistic instead.
    method = "linear" if np.isfinite(arr).all() else "lower"
    q25, med, q75 = np.quantile(arr, [0.25, 0.5, 0.75], method=method)
    return {
        "median": _finite(med), "q25": _finite(q25), "q75": _finite(q75),
        "min": _finite(arr.min()), "max": _finite(arr.max()), "n": len(arr), "n_finite": int(np.isfinite(arr).sum()),
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None  # JSON has no inf: null = not reached in that quantile


def summarize(runs: list[dict[str, Any]], curves: np.ndarray, budgets: Sequence[int], with_regret: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ratio": {str(b): stats([r["ratio"][str(b)] for r in runs]) for b in budgets if str(b) in runs[0]["ratio"]},
        "evals_to": {},
        "seconds_per_trial": stats([r["seconds_per_trial"] for r in runs]),
    }
    median_curve = np.median(curves, axis=0)
    for t in TARGETS:
        entry = stats([r["evals_to"][str(t)] for r in runs])
        entry["within"] = curves.shape[1]
        entry["median_curve"] = first_reach(median_curve, t)  # first budget where the median run is there
        out["evals_to"][str(t)] = entry
    if with_regret:
        out["regret"] = {str(b): stats([r["regret"][str(b)] for r in runs]) for b in budgets if str(b) in runs[0]["regret"]}
    return out


def checks(summary: dict[str, dict[str, Any]], default: str, with_regret: bool) -> dict[str, Any]:
    """The issue's targets, where this benchmark's samplers and budgets allow judging them."""
    out: dict[str, Any] = {}

    def median_ratio(name: str, budget: int) -> float | None:
        return summary.get(name, {}).get("ratio", {}).get(str(budget), {}).get("median")

    for budget, target in ((CHECK_BUDGET_EARLY, TARGETS[0]), (CHECK_BUDGET_LATE, TARGETS[1])):
        value = median_ratio(default, budget)
        out[f"{default}_median_ratio_at_{budget}>={target}"] = None if value is None else bool(value >= target)
    if default in summary and "random" in summary:
        ours = summary[default]["evals_to"][str(TARGETS[0])]
        theirs = summary["random"]["evals_to"][str(TARGETS[0])]
        entry: dict[str, Any] = {default: ours["median"], "random": theirs["median"], "factor": None, "pass": False}
        if ours["median"] is not None:
            # Random not there within its budget: its need is at least that budget (a lower bound).
            need = theirs["median"] if theirs["median"] is not None else theirs["within"]
            entry.update(factor=need / ours["median"], lower_bound=theirs["median"] is None, **{"pass": need / ours["median"] >= 4})
        elif theirs["median"] is not None:
            # The default is not there within its budget: the factor is at most random's need / that budget.
            entry["factor_at_most"] = theirs["median"] / ours["within"]
        out[f"random_evals_to_{TARGETS[0]}_over_{default}"] = entry
    random_100 = median_ratio("random", CHECK_BUDGET_EARLY)
    for name in CHALLENGERS:
        value = median_ratio(name, CHECK_BUDGET_EARLY)
        if value is not None and random_100 is not None:
            out[f"{name}_beats_random_at_{CHECK_BUDGET_EARLY}"] = bool(value > random_100)
    if with_regret:
        out[f"median_regret<={REGRET_TOLERANCE}"] = {
            name: {b: e["median"] is not None and e["median"] <= REGRET_TOLERANCE for b, e in s["regret"].items()}
            for name, s in summary.items()
        }
    return out


def print_table(summary: dict[str, dict[str, Any]], budgets: Sequence[int], with_regret: bool) -> None:
    head = f"{'sampler':<10}" + "".join(f"{'@' + str(b):>9}" for b in budgets) + "".join(f"{'to ' + str(t):>10}" for t in TARGETS) + f"{'s/trial':>9}"
    print("median hypervolume ratio at each budget; evaluations to reach each ratio (median run, '>N' = not within N)")
    print(head)
    for name, s in summary.items():
        cells = "".join(f"{_fmt(s['ratio'].get(str(b), {}).get('median'), '.4f'):>9}" for b in budgets)
        reach = "".join(f"{_reach(s['evals_to'][str(t)]):>10}" for t in TARGETS)
        print(f"{name:<10}{cells}{reach}{s['seconds_per_trial']['median'] * 1e3:>7.1f}ms")
    if with_regret:
        print("median regret of the best feasible accuracy (points)")
        for name, s in summary.items():
            print(f"{name:<10}" + "".join(f"{_fmt(s['regret'].get(str(b), {}).get('median'), '.3f'):>9}" for b in budgets))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _reach(entry: dict[str, Any]) -> str:
    return f">{entry['within']}" if entry["median"] is None else f"{entry['median']:.0f}"


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bound = {args.latency: ("upper", args.latency_budget)} if args.latency_budget is not None else {}
    objectives = Objectives((args.accuracy, args.latency), DIRECTIONS, bound)
    # The space only: overrides of the sampler (search.*) belong to the samplers under test, not to this one.
    _, space, _ = build_sampler("random", [o for o in args.override if not o.lstrip("+~").startswith("search.")], 0)
    evaluator = TabularEvaluator(str(args.table), args.key, space, objectives)

    table_points, table_archs, missing_cells = space_points(space, evaluator, objectives)
    feasible = ~np.isnan(table_points).any(axis=1)
    if not feasible.any():
        raise SystemExit(f"no cell of the space in {args.table} is feasible (latency budget {args.latency_budget})")
    front = table_points[non_dominated_mask(table_points, list(DIRECTIONS))]
    reference = nadir_reference(front, list(DIRECTIONS))
    true_hv = hypervolume(front, list(DIRECTIONS), reference)
    best_feasible = float(np.nanmax(table_points[:, 0])) if args.latency_budget is not None else None
    print(
        f"space: {len(table_points) + missing_cells} cells, {len(table_points)} in the table ({int(feasible.sum())} feasible); "
        f"true front {len(np.unique(front, axis=0))} points, hypervolume {true_hv:.6g} (reference {reference.tolist()})",
        flush=True,
    )
    ceiling = noise_ceiling(table_points, table_archs, reference, true_hv)
    print(f"training-noise ceiling: {ceiling['ratio']:.4f} ({ceiling['networks']} distinct feasible networks at their median)", flush=True)
    if missing_cells:
        print(f"warning: {missing_cells} cells of the space are not in the table; proposing one wastes an evaluation", flush=True)

    plan = {}
    for name in args.samplers:
        seeds = args.seeds_gp if name == "gp" and args.seeds_gp is not None else args.seeds
        max_budget = max(args.budgets)
        if name == "gp" and args.max_budget_gp is not None:
            max_budget = args.max_budget_gp
        if name == "random" and args.max_budget_random is not None:
            max_budget = max(max_budget, args.max_budget_random)
        plan[name] = {"seeds": seeds, "max_budget": max_budget}

    runs: list[dict[str, Any]] = []
    curves: dict[str, np.ndarray] = {}
    summary: dict[str, dict[str, Any]] = {}
    sampler_configs: dict[str, Any] = {}
    for name, p in plan.items():
        sampler_runs, sampler_curves = [], []
        for seed in range(p["seeds"]):
            sampler, space, sampler_configs[name] = build_sampler(name, args.override, seed)
            result = run_study(sampler, space, evaluator, objectives, p["max_budget"])
            figures = run_figures(result["points"], args.budgets, reference, true_hv, best_feasible)
            sampler_curves.append(figures.pop("curve"))
            run = {
                "sampler": name, "seed": seed, "evaluations": result["evaluations"], "duplicates": result["duplicates"],
                "distinct": result["distinct"], "missing": result["missing"], "seconds": result["seconds"],
                "seconds_per_trial": result["seconds"] / result["evaluations"], **figures,
            }
            sampler_runs.append(run)
            print(
                f"{name} seed {seed}: ratio " + " ".join(f"@{b}={v:.4f}" for b, v in run["ratio"].items())
                + f"  ({result['seconds']:.1f} s)", flush=True,
            )
        runs += sampler_runs
        curves[name] = np.vstack(sampler_curves)
        summary[name] = summarize(sampler_runs, curves[name], args.budgets, best_feasible is not None)
        sampler_configs[name] = {k: v for k, v in sampler_configs[name].items() if k != "seed"}

    default = default_sampler()
    result = {
        "settings": {
            "table": str(args.table), "key": args.key, "accuracy": args.accuracy, "latency": args.latency,
            "directions": list(DIRECTIONS), "latency_budget_ms": args.latency_budget, "budgets": args.budgets,
            "samplers": plan, "overrides": list(args.override), "sampler_configs": sampler_configs,
            "targets": list(TARGETS), "default_sampler": default, "runner": "search.runners.local_runner.run_in_process",
        },
        "table": {
            "space_cells": len(table_points) + missing_cells, "cells_in_table": len(table_points),
            "cells_missing": missing_cells, "feasible_cells": int(feasible.sum()), "best_feasible_accuracy": best_feasible,
        },
        "true_front": {"size": len(np.unique(front, axis=0)), "hypervolume": true_hv, "reference": reference.tolist()},
        "noise_ceiling": ceiling,
        "summary": summary,
        "checks": checks(summary, default, best_feasible is not None),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dumps(result))
    plot = plot_hypervolume_curve(
        args.out.with_suffix(".png"),
        # Up to the largest budget: random's longer run (--max-budget-random) would squash the rest.
        {name: c[:, : max(args.budgets)] for name, c in curves.items()},
        x_label="evaluations",
        y_label="hypervolume / true front's",
        title=f"{args.accuracy} vs {args.latency}" + (f" <= {args.latency_budget:g} ms" if args.latency_budget else ""),
        targets=TARGETS,
    )
    print_table(summary, args.budgets, best_feasible is not None)
    print(f"wrote {args.out} and {plot}")
    return result


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1)


if __name__ == "__main__":
    main()
