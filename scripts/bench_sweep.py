"""How long does the default search take, where does the time go, and is int8 faster than fp32?

    .venv/bin/python -m hwnas.scripts.bench_sweep [--out results/bench/sweep.json] [--repeats 300] \
        [--skip-int8] [-- hwnas overrides ...]

Runs `hwnas` exactly as `make search` does (a subprocess, default config), overriding only
`run_dir` and `tracking.uri` (both under results/bench/sweep_runs/, git-ignored) plus any
overrides after `--`. Reports the command's wall time (Ray start-up and export included: what the
user waits for), the sweep phase (first trial start to last trial end, from trials.jsonl), per-step
time totals, trials per minute and the platform overhead

    overhead = 1 - sum(trial total_s) / (elapsed_s * concurrency)

against both the wall time (the target) and the sweep phase. Then, for every architecture on the
front (net_id + prune ratio), the fp32 and int8 versions are evaluated through the run's own
`PipelineEvaluator` (rebuilt from its config.yaml; a trial of the exact candidate is reused), and
the two files are timed again back to back with more repeats, in ABBA order so that a drift in the
machine's load hits both alike. Writes `--out` (JSON) and a PNG of the speed-ups beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hwnas.scripts.sweep_run import split_overrides
from hwnas.spaces.candidate import arch_id  # noqa: E402

ROOT = Path.cwd()  # results/ of the folder it runs in (the repository root, run as python -m hwnas.scripts.NAME)
STEP_KEYS = ("data_s", "build_s", "train_s", "factorize_s", "prune_s", "finetune_s", "profile_s", "export_s", "compress_s", "accuracy_s", "latency_s", "total_s")
TARGET_WALL_S = 600.0  # `make search` in at most 10 minutes on 2 cores
TARGET_OVERHEAD = 0.15
COMPLETE = "COMPLETE"
QUANT_PAIR = ("fp32", "int8")
DEPTHWISE_BLOCKS = ("dwsep", "ir")  # block names that hold a depthwise conv (ir1, ir3, ir6 start with "ir")


# ---- pure computations (tested in tests/test_bench_sweep.py) ----


def platform_overhead(compute_s: float, elapsed_s: float, concurrency: int) -> float:
    """Share of the paid-for slot time (elapsed x concurrent slots) not spent inside trials."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s: {elapsed_s!r} is not allowed; allowed: a time > 0")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency: {concurrency!r} is not allowed; allowed: an integer >= 1")
    if compute_s < 0:
        raise ValueError(f"compute_s: {compute_s!r} is not allowed; allowed: a time >= 0")
    return 1.0 - compute_s / (elapsed_s * concurrency)


def complete_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == COMPLETE]


def step_totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Sum of every `<step>_s` metric over the complete trials (a failed trial has no timings)."""
    totals: dict[str, float] = {}
    for r in complete_rows(rows):
        for key, value in (r.get("metrics") or {}).items():
            if key.endswith("_s"):
                totals[key] = totals.get(key, 0.0) + float(value)
    return dict(sorted(totals.items(), key=lambda kv: STEP_KEYS.index(kv[0]) if kv[0] in STEP_KEYS else len(STEP_KEYS)))


def sweep_window(rows: Iterable[Mapping[str, Any]]) -> tuple[float, float]:
    """(first trial start, last trial end), epoch seconds: trials.jsonl stamps each trial's end
    (`finished_at`); its start is that end less the trial's own `total_s`."""
    done = complete_rows(rows)
    if not done:
        raise ValueError("rows: no COMPLETE trial with finished_at; allowed: a finished sweep's trials.jsonl rows")
    starts = [float(r["finished_at"]) - float(r["metrics"]["total_s"]) for r in done]
    ends = [float(r["finished_at"]) for r in rows if r.get("finished_at") is not None]
    return min(starts), max(ends)


def block_kinds(candidate: Mapping[str, Any]) -> list[str]:
    """The `stage<i>.block` values of the active stages, in order."""
    return [str(candidate[f"stage{i}.block"]) for i in range(1, int(candidate["n_stages"]) + 1)]


def block_mix(candidate: Mapping[str, Any]) -> str:
    """'conv' for a plain-conv net, 'depthwise' for one whose every stage holds a depthwise conv, else 'mixed'."""
    has_dw = [k.startswith(DEPTHWISE_BLOCKS) for k in block_kinds(candidate)]
    return "conv" if not any(has_dw) else "depthwise" if all(has_dw) else "mixed"


def compression_pairs(
    rows: Sequence[Mapping[str, Any]], pair: tuple[str, str] = QUANT_PAIR, front_only: bool = True
) -> list[dict[str, Any]]:
    """One entry per distinct (architecture, prune ratio) on the front (or, front_only=False, among all
    complete trials, front ones first): the candidate in each format of `pair`, and the complete sweep
    row of that exact candidate when the sweep evaluated it."""
    by_arch = {r["arch_id"]: r for r in complete_rows(rows)}
    seen: set[tuple[str, float]] = set()
    out: list[dict[str, Any]] = []
    ordered = [r for r in rows if r.get("pareto")] + ([] if front_only else [r for r in complete_rows(rows) if not r.get("pareto")])
    for r in ordered:
        cand = dict(r["candidate"])
        key = (r["net_id"], float(cand.get("prune_ratio", 0.0)))
        if key in seen:
            continue
        seen.add(key)
        entry: dict[str, Any] = {
            "net_id": key[0], "prune_ratio": key[1], "on_front": bool(r.get("pareto")),
            "from_trial": r["number"], "from_quant": cand.get("quant"),
        }
        for fmt in pair:
            c = {**cand, "quant": fmt}
            entry[fmt] = {"candidate": c, "arch_id": arch_id(c), "row": by_arch.get(arch_id(c))}
        out.append(entry)
    return out


def speedup(fp32_ms: float, int8_ms: float) -> float:
    if fp32_ms <= 0 or int8_ms <= 0:
        raise ValueError(f"latency: ({fp32_ms!r}, {int8_ms!r}) ms is not allowed; allowed: times > 0")
    return fp32_ms / int8_ms


def median_or_none(values: Iterable[float]) -> float | None:
    items = list(values)
    return float(statistics.median(items)) if items else None


def speedups_by_block(results: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Median of `key` over the architectures of each block mix, and over those holding each block kind."""
    groups: dict[str, list[float]] = {}
    for res in results:
        value = res.get(key)
        if value is None:
            continue
        labels = {f"mix={res['block_mix']}"} | {f"has={k}" for k in res["blocks"]}
        for label in labels:
            groups.setdefault(label, []).append(float(value))
    return {k: {"n": len(v), "median": median_or_none(v), "values": v} for k, v in sorted(groups.items())}


def target(name: str, limit: str, measured: float | None, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": name, "limit": limit, "measured": measured, "met": met, **({"note": note} if note else {})}


# ---- the run ----


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_before": list(load_before),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def run_search(command: list[str], log_path: Path) -> dict[str, Any]:
    """Run the search, stamping every output line with its time since start (the progress line
    prints on each change, so its first line is the first trial start as the driver sees it)."""
    start_epoch, start = time.time(), time.perf_counter()
    stamped: list[tuple[float, str]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((time.perf_counter() - start, line.rstrip("\n")))
            print(line, end="", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - start
    log_path.write_text("".join(f"{t:8.2f} {line}\n" for t, line in stamped))
    first_progress = next((t for t, line in stamped if line.startswith("[hwnas]") and "running" in line), None)
    return {"rc": rc, "wall_s": wall, "start_epoch": start_epoch, "first_progress_line_s": first_progress, "log": str(log_path)}


def sweep_figures(rows: list[dict[str, Any]], wall_s: float, start_epoch: float, concurrency: int) -> dict[str, Any]:
    done = complete_rows(rows)
    totals = step_totals(rows)
    compute = totals.get("total_s", 0.0)
    first, last = sweep_window(rows)
    sweep_s = last - first
    return {
        "wall_s": wall_s,
        "sweep_s": sweep_s,
        "startup_s": first - start_epoch,  # command start -> first trial's evaluate() starts
        "after_last_trial_s": start_epoch + wall_s - last,  # last trial end -> command exit (tables, export, MLflow)
        "trials": len(rows),
        "complete": len(done),
        "failed": len(rows) - len(done),
        "concurrency": concurrency,
        "trials_per_minute": len(rows) / (wall_s / 60.0),
        "trials_per_minute_sweep_phase": len(rows) / (sweep_s / 60.0) if sweep_s > 0 else None,
        "trial_compute_s": compute,
        "trial_total_s_median": median_or_none(float(r["metrics"]["total_s"]) for r in done),
        "step_totals_s": totals,
        # seconds inside trials that no step clocked (total_s less the sum of the steps): the steps
        # should be the whole evaluation; tests/test_pipeline.py checks only total_s >= the sum.
        "unclocked_s_in_trials": compute - sum(v for k, v in totals.items() if k != "total_s"),
        "overhead_vs_wall": platform_overhead(compute, wall_s, concurrency),
        "overhead_vs_sweep_phase": platform_overhead(compute, sweep_s, concurrency) if sweep_s > 0 else None,
        "idle_slot_s_in_sweep_phase": sweep_s * concurrency - compute,
        "idle_slot_s_per_trial_in_sweep_phase": (sweep_s * concurrency - compute) / max(1, len(rows)),
        "front_size": sum(bool(r.get("pareto")) for r in rows),
    }


def _trial_info(row: Mapping[str, Any]) -> dict[str, Any]:
    m = row["metrics"]
    return {
        "source": f"sweep trial {row['number']}",
        "latency_ms": m["latency_ms"],
        "latency_p90_ms": m["latency_p90_ms"],
        "val_accuracy": m["val_accuracy"],
        "model_bytes": m["model_bytes"],
        "total_s": m["total_s"],
        "artifact": row.get("artifact"),
    }


def compare_int8(run_dir: Path, rows: list[dict[str, Any]], repeats: int, front_only: bool) -> dict[str, Any]:
    """fp32 vs int8 of each front architecture (or every one of the sweep): the evaluator's numbers,
    then an ABBA re-timing. Medians over the front are the headline; `*_all` cover every one compared."""
    from omegaconf import OmegaConf

    from hwnas.evaluators.latency import measure_latency
    from hwnas.search.experiment import build_experiment

    built = build_experiment(OmegaConf.load(run_dir / "config.yaml"))
    evaluator = built.sweep.evaluator
    target_hw = evaluator.latency.target  # the plan's target: timed afresh, never from the cache
    long_target = replace(target_hw, repeats=max(1, repeats // 2), warmup=max(target_hw.warmup, 20))
    input_shape = None
    results: list[dict[str, Any]] = []
    for entry in compression_pairs(rows, front_only=front_only):
        res: dict[str, Any] = {
            "net_id": entry["net_id"],
            "prune_ratio": entry["prune_ratio"],
            "on_front": entry["on_front"],
            "from_trial": entry["from_trial"],
            "from_quant": entry["from_quant"],
            "blocks": block_kinds(entry["fp32"]["candidate"]),
            "block_mix": block_mix(entry["fp32"]["candidate"]),
            "candidate": {k: v for k, v in entry["fp32"]["candidate"].items() if k != "quant"},
        }
        for fmt in QUANT_PAIR:
            row = entry[fmt]["row"]
            if row is not None:
                res[fmt] = _trial_info(row)
                continue
            trial_dir = run_dir / "bench_int8" / f"{entry['net_id']}_p{entry['prune_ratio']:g}_{fmt}"
            ev = evaluator.evaluate(entry[fmt]["candidate"], trial_dir)
            m = ev.metrics
            res[fmt] = {
                "source": "re-evaluated",
                "latency_ms": m["latency_ms"],
                "latency_p90_ms": m["latency_p90_ms"],
                "val_accuracy": m["val_accuracy"],
                "model_bytes": m["model_bytes"],
                "total_s": m["total_s"],
                "artifact": ev.artifact,
            }
            input_shape = tuple(ev.info["input_shape"])
        res["speedup"] = speedup(res["fp32"]["latency_ms"], res["int8"]["latency_ms"])
        results.append(res)
        print(f"[bench] {'front' if entry['on_front'] else 'other'} {entry['net_id']} p={entry['prune_ratio']:g} {res['block_mix']:9s} {'/'.join(res['blocks'])}: "
              f"fp32 {res['fp32']['latency_ms']:.4f} ms, int8 {res['int8']['latency_ms']:.4f} ms -> x{res['speedup']:.2f}", flush=True)
    if input_shape is None:
        evaluator.data.setup()
        input_shape = tuple(evaluator.data.input_shape)
    # Back to back, A B B A: a change in load during the pair touches both files equally.
    for res in results:
        halves: dict[str, list[float]] = {fmt: [] for fmt in QUANT_PAIR}
        for fmt in (*QUANT_PAIR, *reversed(QUANT_PAIR)):
            halves[fmt].append(measure_latency(res[fmt]["artifact"], long_target, input_shape).median_ms)
        for fmt in QUANT_PAIR:
            res[fmt]["retimed_ms"] = statistics.fmean(halves[fmt])
            res[fmt]["retimed_halves_ms"] = halves[fmt]
        res["speedup_retimed"] = speedup(res["fp32"]["retimed_ms"], res["int8"]["retimed_ms"])
    front = [r for r in results if r["on_front"]]
    # The issue's own question: the int8 points the search put on the front, against fp32 of the same net.
    int8_front = [r for r in front if r["from_quant"] == "int8"]
    return {
        "latency_target": {"name": target_hw.name, "threads": target_hw.threads, "batch_size": target_hw.batch_size},
        "scope": "front" if front_only else "all",
        "sweep_repeats": target_hw.repeats,
        "retimed_repeats_per_file": 2 * long_target.repeats,
        "retiming": "ABBA: fp32, int8, int8, fp32, each a measure_latency median of repeats/2 runs; retimed_ms = mean of the two medians",
        "architectures": results,
        "front_architectures": len(front),
        "median_speedup": median_or_none(r["speedup"] for r in front),
        "median_speedup_retimed": median_or_none(r["speedup_retimed"] for r in front),
        "int8_faster_count_retimed": sum(r["speedup_retimed"] > 1.0 for r in front),
        "int8_front_points": len(int8_front),
        "int8_front_median_speedup_retimed": median_or_none(r["speedup_retimed"] for r in int8_front),
        "int8_front_speedups_retimed": [r["speedup_retimed"] for r in int8_front],
        "by_block": speedups_by_block(front, "speedup_retimed"),
        "by_block_sweep_timing": speedups_by_block(front, "speedup"),
        "all_architectures": len(results),
        "median_speedup_all": median_or_none(r["speedup"] for r in results),
        "median_speedup_retimed_all": median_or_none(r["speedup_retimed"] for r in results),
        "int8_faster_count_retimed_all": sum(r["speedup_retimed"] > 1.0 for r in results),
        "by_block_all": speedups_by_block(results, "speedup_retimed"),
    }


def plot_speedups(path: Path, results: Sequence[Mapping[str, Any]]) -> Path | None:
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"conv": "tab:blue", "mixed": "tab:purple", "depthwise": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for mix, color in colors.items():
        pts = [r for r in results if r["block_mix"] == mix]
        if pts:
            # Front architectures drawn with a black edge: the headline median is over them.
            ax.scatter([r["fp32"]["retimed_ms"] for r in pts], [r["speedup_retimed"] for r in pts], c=color, label=mix,
                       edgecolors=["black" if r["on_front"] else "none" for r in pts], linewidths=1.5)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("fp32 latency (ms, ABBA re-timed)")
    ax.set_ylabel("speed-up fp32 / int8")
    ax.set_title("int8 vs fp32 per architecture (black edge: on the front)")
    ax.legend(title="blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def targets_section(figures: Mapping[str, Any], compare: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    out = [
        target("make search (20 trials, 2 concurrent) wall time", f"<= {TARGET_WALL_S:g} s", figures["wall_s"], figures["wall_s"] <= TARGET_WALL_S),
        target("platform overhead = 1 - sum(total_s) / (wall_s x concurrency)", f"<= {TARGET_OVERHEAD:.0%}",
               figures["overhead_vs_wall"], figures["overhead_vs_wall"] <= TARGET_OVERHEAD),
    ]
    if compare is None:
        out.append(target("int8 faster than fp32 on the front (median speed-up)", "> 1", None, None, "not measured (--skip-int8)"))
    else:
        own = compare["int8_front_median_speedup_retimed"]
        out.append(target("int8 points on the front faster than fp32 of the same net (median speed-up, ABBA re-timed)", "> 1", own,
                          None if own is None else own > 1.0, f"{compare['int8_front_points']} int8 points on the front"))
        med = compare["median_speedup_retimed"]
        out.append(target("int8 faster than fp32 for every front architecture (median speed-up, ABBA re-timed)", "> 1", med,
                          None if med is None else med > 1.0,
                          f"sweep-timing median {compare['median_speedup']}; int8 faster on "
                          f"{compare['int8_faster_count_retimed']}/{compare['front_architectures']} front architectures"))
    return out


def load_rows(run_dir: Path) -> list[dict[str, Any]]:
    """trials.jsonl rows with `pareto` set from pareto.csv (the log is appended before the front is known)."""
    import pandas as pd

    from hwnas.search.trial_log import TrialLog, artifact_path

    rows = TrialLog(run_dir).rows()
    pareto_numbers = set(pd.read_csv(run_dir / "pareto.csv")["number"].tolist())
    for r in rows:
        r["pareto"] = r["number"] in pareto_numbers
        if r.get("artifact"):
            r["artifact"] = str(artifact_path(run_dir, r))  # the record keeps it relative to the run folder
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args_in, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/sweep.json")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "results/bench/sweep_runs",
                        help="where the sweep's run_dir and MLflow store go (git-ignored)")
    parser.add_argument("--repeats", type=int, default=300, help="timed runs per file in the int8/fp32 re-timing")
    parser.add_argument("--scope", choices=("front", "all"), default="front",
                        help="compare int8/fp32 on the front's architectures only, or on every one of the sweep too")
    parser.add_argument("--skip-int8", action="store_true", help="only time the search")
    parser.add_argument("--reuse-run", type=Path, default=None,
                        help="redo only the int8/fp32 comparison on the run recorded in --out (its run_dir)")
    parser.add_argument("--hwnas", default=str(Path(sys.executable).with_name("hwnas")))
    args = parser.parse_args(args_in)
    if args.repeats < 2:
        parser.error(f"--repeats: {args.repeats} is too few; allowed: an integer >= 2")

    from omegaconf import OmegaConf

    from hwnas.search.export import library_versions

    if args.reuse_run is not None:
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        run_dir = args.reuse_run.resolve()
        if previous.get("run_dir") != str(run_dir):
            parser.error(f"--reuse-run: {str(run_dir)!r} is not the run recorded in {args.out}; allowed: {previous.get('run_dir')!r}")
        rows = load_rows(run_dir)
        report = dict(previous)
        report["machine"]["loadavg_before_compare"] = list(os.getloadavg())
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = (args.runs_dir / stamp).resolve()
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(args.runs_dir / 'mlflow.db').resolve()}"
        command = [args.hwnas, f"run_dir={run_dir}", f"tracking.uri={uri}", *extra]
        load_before = os.getloadavg()
        print("[bench] running:", " ".join(command), flush=True)
        run = run_search(command, args.runs_dir / f"{stamp}.log")
        load_after_search = os.getloadavg()
        if run["rc"] != 0:
            print(f"[bench] hwnas exited with {run['rc']}; see {run['log']}", file=sys.stderr)
            return 1
        cfg = OmegaConf.load(run_dir / "config.yaml")
        # Runners without a concurrency knob (runner=local) run one trial at a time.
        concurrency = int(cfg.runner.max_concurrent) if "max_concurrent" in cfg.runner else 1
        rows = load_rows(run_dir)
        figures = sweep_figures(rows, run["wall_s"], run["start_epoch"], concurrency)
        figures["first_progress_line_s"] = run["first_progress_line_s"]
        report = {
            "command": command,
            "bench_command": [sys.executable, *sys.argv],
            "run_dir": str(run_dir),
            "config": {"n_trials": int(cfg.n_trials), "runner": cfg.runner._target_.rsplit(".", 1)[-1], "concurrency": concurrency,
                       "search": cfg.search._target_.rsplit(".", 1)[-1], "tracking": bool(cfg.tracking.enabled)},
            "machine": {**machine(load_before), "loadavg_after_search": list(load_after_search)},
            "libraries": library_versions(),
            "search": figures,
            "int8_vs_fp32": None,
        }

    if not args.skip_int8:
        report["int8_vs_fp32"] = compare_int8(run_dir, rows, args.repeats, front_only=args.scope == "front")
        report["compare_command"] = [sys.executable, *sys.argv]
        png = plot_speedups(args.out.with_name(args.out.stem + "_front.png"), report["int8_vs_fp32"]["architectures"])
        report["plot"] = str(png) if png else None
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    report["targets"] = targets_section(report["search"], report["int8_vs_fp32"])
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"[bench] wrote {args.out}")
    return 0


def summary(report: Mapping[str, Any]) -> str:
    s = report["search"]
    lines = [
        f"[bench] wall {s['wall_s']:.1f} s (start-up {s['startup_s']:.1f} s, sweep phase {s['sweep_s']:.1f} s, "
        f"after last trial {s['after_last_trial_s']:.1f} s); {s['trials']} trials, {s['failed']} failed, "
        f"{s['trials_per_minute']:.2f}/min; front {s['front_size']}",
        f"[bench] trial compute {s['trial_compute_s']:.1f} s; overhead {s['overhead_vs_wall']:.1%} of wall x {s['concurrency']}, "
        f"{s['overhead_vs_sweep_phase']:.1%} of sweep phase x {s['concurrency']}",
        "[bench] step totals: " + ", ".join(f"{k} {v:.1f}" for k, v in s["step_totals_s"].items()),
    ]
    c = report["int8_vs_fp32"]
    if c is not None:
        lines.append(f"[bench] int8 vs fp32 on {c['front_architectures']} front architectures: median speed-up "
                     f"{c['median_speedup']} (sweep timing), {c['median_speedup_retimed']} (ABBA re-timed)")
        lines.append(f"[bench] int8 points on the front ({c['int8_front_points']}): speed-ups over fp32 of the same net "
                     f"{[round(x, 2) for x in c['int8_front_speedups_retimed']]}, median {c['int8_front_median_speedup_retimed']}")
        lines.append("[bench] by block (front): " + ", ".join(f"{k} {v['median']:.2f} (n={v['n']})" for k, v in c["by_block"].items()))
        if c["scope"] == "all":
            lines.append(f"[bench] all {c['all_architectures']} architectures: median speed-up {c['median_speedup_retimed_all']} (ABBA), "
                         f"int8 faster on {c['int8_faster_count_retimed_all']}")
            lines.append("[bench] by block (all): " + ", ".join(f"{k} {v['median']:.2f} (n={v['n']})" for k, v in c["by_block_all"].items()))
    for t in report["targets"]:
        lines.append(f"[bench] target {t['target']} {t['limit']}: {t['measured']} -> {'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}")
    m = report["machine"]
    lines.append(f"[bench] load average before {m['loadavg_before']}, after search {m['loadavg_after_search']}, after {m['loadavg_after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
