"""What does the platform cost per trial, does a second trial slot double throughput, does the driver leak?

    .venv/bin/python -m hwnas.scripts.bench_runtime [--out results/bench/runtime.json] [--ray-trials 200] \
        [--local-trials 2000] [--tracked-trials 200] [--scaling-trials 8] [--memory-trials 1000] \
        [--skip-overhead] [--skip-scaling] [--skip-memory]

(a) Overhead: `hwnas` runs (subprocesses, as a user runs them) whose trials cost nothing: the
    NAS-Bench-201 space looked up in a generated table of all 15,625 cells (`evaluator=tabular`),
    with `search=random` so that the sampler's own cost does not grow with the history. Start-up
    (command launch -> first trial recorded) and teardown (last trial -> exit, i.e. export + Ray
    shutdown) are reported apart from the steady state, which is measured from trials.jsonl's
    `finished_at` stamps: (n - 1) trials between the first and the last record. The median fsync
    time of the disk is probed before and after each run: a local trial costs ~9 fsyncs (one per
    Optuna journal entry, one for trials.jsonl), so its price moves with the disk's.
(b) Scaling: the default digits search (`hwnas` defaults, real training) with
    `runner.max_concurrent=1` and `=2`. Trials differ in size, so both runs use `search=random`
    with the same seed: the same candidates in the same order (checked), so the two throughputs
    compare the same work. Throughput = trials / sweep phase (first trial start to last trial end);
    efficiency = (throughput_2 / throughput_1) / 2. The compute rate (sum of trial `total_s` per
    wall second) is reported too: it shows how much slower a trial gets when two share the machine.
    Control: two busy-loop processes at nice 15 (Ray's worker niceness) timed against one, before
    and after: the parallelism the machine actually offers trials (other jobs take cores too).
(c) Driver memory: a local-runner sweep run in-process (a child process of this script, so nothing
    else lives in it), the driver's RSS sampled every 100 trials from inside the evaluator.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path.cwd()  # results/ of the folder it runs in (the repository root, run as python -m hwnas.scripts.NAME)
WORK = ROOT / "results" / "bench" / "runtime_runs"
TABLE_METRICS = "objective.metrics=[{name: acc, mode: max}, {name: latency_ms, mode: min}]"
TARGET_RAY_S_PER_TRIAL = 0.15
TARGET_LOCAL_TRIALS_PER_S = 50.0
TARGET_EFFICIENCY = 0.8
TARGET_MB_PER_100 = 50.0


# ---- measurements from a finished run ----


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_state(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds per trial and trials per second between the first and the last recorded trial."""
    stamps = sorted(float(r["finished_at"]) for r in rows)
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise ValueError(f"rows: {len(stamps)} trials with distinct end stamps; need at least 2")
    span = stamps[-1] - stamps[0]
    return {"s_per_trial": span / (len(stamps) - 1), "trials_per_s": (len(stamps) - 1) / span, "span_s": span}


def sweep_phase(rows: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """(first trial start, last trial end), epoch seconds; a start is the end less the trial's total_s."""
    starts = [float(r["finished_at"]) - float(r["metrics"].get("total_s", 0.0)) for r in rows]
    return min(starts), max(float(r["finished_at"]) for r in rows)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rss_mb() -> float:
    # /proc, not psutil: no extra dependency, and this is Linux-only by design of the measurement.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS missing from /proc/self/status")


def fsync_ms(folder: Path, n: int = 50) -> float:
    """Median time of appending one line to a file and fsyncing it, in folder: the unit price of
    the sweep's durable writes (trials.jsonl, and every Optuna journal entry)."""
    path = folder / "fsync_probe.txt"
    times = []
    with open(path, "ab") as f:
        for _ in range(n):
            start = time.perf_counter()
            f.write(b"x" * 200 + b"\n")
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - start)
    path.unlink()
    return 1000 * sorted(times)[n // 2]


# ---- running hwnas ----


def hwnas(overrides: Sequence[str], log: Path, timeout_s: float) -> dict[str, Any]:
    """Run the CLI as a user does; return launch time, wall time and exit status."""
    command = [sys.executable, "-c", "import sys; from hwnas.search.cli import main; sys.exit(main())", *overrides]
    launched = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"hwnas exited {proc.returncode}; see {log}")
    return {"launched": launched, "ended": ended, "wall_s": ended - launched}


def make_table(path: Path) -> Path:
    """Every NAS-Bench-201 cell with generated numbers: a look-up costs microseconds."""
    import numpy as np
    import pandas as pd

    from hwnas.spaces.nb201 import EDGE_KEYS, OPS, to_arch_string

    rng = np.random.default_rng(0)
    cells = [dict(zip(EDGE_KEYS, ops, strict=True)) for ops in itertools.product(OPS, repeat=len(EDGE_KEYS))]
    pd.DataFrame({
        "arch": [to_arch_string(c) for c in cells],
        "acc": rng.uniform(0.1, 0.95, len(cells)),
        "latency_ms": rng.uniform(0.2, 5.0, len(cells)),
    }).to_csv(path, index=False)
    return path


def trivial_overrides(table: Path, runner: str, n: int, run_dir: Path, tracking: bool) -> list[str]:
    return [
        "experiment=nb201_tabular", f"evaluator.table={table}", TABLE_METRICS, "search=random",
        f"runner={runner}", f"n_trials={n}", f"run_dir={run_dir}", f"tracking.enabled={str(tracking).lower()}",
        f"tracking.uri=sqlite:///{run_dir.parent / (run_dir.name + '_mlflow.db')}",
    ]


def overhead_case(table: Path, runner: str, n: int, tracking: bool) -> dict[str, Any]:
    name = f"{runner}_{'tracked' if tracking else 'untracked'}_{n}"
    run_dir = WORK / name
    load, fsync_before = loadavg(), fsync_ms(WORK)
    timing = hwnas(trivial_overrides(table, runner, n, run_dir, tracking), WORK / f"{name}.log", timeout_s=3600)
    rows = read_rows(run_dir)
    stamps = sorted(float(r["finished_at"]) for r in rows)
    steady = steady_state(rows)
    case = {
        "runner": runner,
        "tracking": "sqlite" if tracking else "off",
        "n_trials": len(rows),
        "failed": sum(r["status"] != "COMPLETE" for r in rows),
        "startup_s": stamps[0] - timing["launched"],
        "teardown_s": timing["ended"] - stamps[-1],
        "wall_s": timing["wall_s"],
        **steady,
        "loadavg_before": load,
        "loadavg_after": loadavg(),
        "fsync_ms_before_after": [fsync_before, fsync_ms(WORK)],
        "run_dir": str(run_dir),
    }
    print(
        f"  {name:<24} {case['trials_per_s']:8.1f} trials/s  {case['s_per_trial'] * 1000:8.1f} ms/trial  "
        f"start-up {case['startup_s']:5.1f} s  teardown {case['teardown_s']:5.1f} s  load {load[0]}  "
        f"fsync {fsync_before:.1f} ms",
        flush=True,
    )
    return case


def scaling_case(concurrency: int, n: int, seed: int, repeat: int = 0) -> dict[str, Any]:
    run_dir = WORK / f"scaling_c{concurrency}_r{repeat}"
    load = loadavg()
    overrides = [
        "search=random", f"seed={seed}", f"n_trials={n}", f"runner.max_concurrent={concurrency}",
        "tracking.enabled=false", f"run_dir={run_dir}",
    ]
    timing = hwnas(overrides, WORK / f"{run_dir.name}.log", timeout_s=3600)
    rows = [r for r in read_rows(run_dir) if r["status"] == "COMPLETE"]
    start, end = sweep_phase(rows)
    phase = end - start
    compute = sum(float(r["metrics"]["total_s"]) for r in rows)
    case = {
        "max_concurrent": concurrency,
        "repeat": repeat,
        "n_trials": len(rows),
        "wall_s": timing["wall_s"],
        "sweep_phase_s": phase,
        "trials_per_min": 60 * len(rows) / phase,
        "compute_s": compute,
        "compute_s_per_wall_s": compute / phase,
        "mean_trial_s": compute / len(rows),
        "candidates": [r["arch_id"] for r in sorted(rows, key=lambda r: r["number"])],
        "loadavg_before": load,
        "loadavg_after": loadavg(),
    }
    print(
        f"  max_concurrent={concurrency}: {case['trials_per_min']:.2f} trials/min over {phase:.0f} s, "
        f"mean trial {case['mean_trial_s']:.1f} s, load {load[0]}",
        flush=True,
    )
    return case


def scaling_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled over repeats: throughput = all trials / all sweep-phase seconds of each concurrency.

    Identical trials vary by +-30% from run to run on this machine, so one pair of 8-trial sweeps
    decides little; the runs are made in ABBA order so that a drift in the machine hits both alike.
    """
    by = {c: [r for r in runs if r["max_concurrent"] == c] for c in (1, 2)}
    rate = {c: sum(r["n_trials"] for r in rs) / sum(r["sweep_phase_s"] for r in rs) for c, rs in by.items()}
    compute_rate = {c: sum(r["compute_s"] for r in rs) / sum(r["sweep_phase_s"] for r in rs) for c, rs in by.items()}
    mean_trial = {c: sum(r["compute_s"] for r in rs) / sum(r["n_trials"] for r in rs) for c, rs in by.items()}
    pairs = [
        (a["sweep_phase_s"] / b["sweep_phase_s"]) / 2 for a, b in zip(by[1], by[2], strict=True)
    ]
    return {
        "runs": runs,
        "same_candidates": len({tuple(r["candidates"]) for r in runs}) == 1,
        "efficiency": (rate[2] / rate[1]) / 2,
        "efficiency_per_repeat": pairs,
        "compute_efficiency": (compute_rate[2] / compute_rate[1]) / 2,
        "trial_slowdown_when_paired": mean_trial[2] / mean_trial[1],
    }


def cpu_parallelism(loops: int = 30_000_000) -> float:
    """Wall time of one busy process / wall time of two run together: 1.0 when two cores are free for us.

    A control for (b): on a machine shared with other jobs, two trials cannot scale past this.
    """
    # At nice 15, as Ray runs its workers: a job at a lower nice value on the machine takes precedence.
    busy = [sys.executable, "-c", f"import os\nos.nice(15)\ns = 0\nfor i in range({loops}): s += i"]

    def wall(copies: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen(busy) for _ in range(copies)]
        for p in procs:
            p.wait()
        return time.perf_counter() - start

    return wall(1) / wall(2)


# ---- (c) driver memory, in a child process ----


def memory_child(n: int, every: int, tracking: bool, table: Path, out: Path) -> None:
    """Run a local sweep in this process; the evaluator wrapper samples RSS every `every` trials."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hwnas.search.config import compose_config, validate
    from hwnas.search.experiment import build_experiment, prepare_run_dir, run_sweep

    run_dir = WORK / f"memory_{'tracked' if tracking else 'untracked'}_{n}"
    cfg = compose_config(trivial_overrides(table, "local", n, run_dir, tracking))
    validate(cfg)
    prepare_run_dir(cfg)
    built = build_experiment(cfg)
    inner = built.sweep.evaluator
    samples: list[dict[str, float]] = [{"trials": 0, "rss_mb": rss_mb()}]

    class Sampled:
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Any:
            self.calls += 1
            if self.calls % every == 1 and self.calls > 1:  # the state after calls - 1 finished trials
                samples.append({"trials": self.calls - 1, "rss_mb": rss_mb()})
            return inner.evaluate(candidate, trial_dir, deadline=deadline)

    built.sweep.evaluator = Sampled()  # type: ignore[assignment]
    status = run_sweep(built)
    samples.append({"trials": len(read_rows(run_dir)), "rss_mb": rss_mb()})
    out.write_text(json.dumps({"status": status, "samples": samples}))


def memory_case(n: int, every: int, tracking: bool, table: Path) -> dict[str, Any]:
    out = WORK / f"memory_{'tracked' if tracking else 'untracked'}.json"
    command = [
        sys.executable, "-m", "hwnas.scripts.bench_runtime", "--memory-child", str(n), "--memory-every", str(every),
        "--table", str(table), "--out-child", str(out), *(["--tracked"] if tracking else []),
    ]
    with open(WORK / f"memory_{'tracked' if tracking else 'untracked'}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=3600, check=True)
    samples = json.loads(out.read_text())["samples"]
    # Growth after warm-up: the first 100 trials include one-off caches (Optuna, pandas, MLflow).
    warm = [s for s in samples if s["trials"] >= every]
    growth = (warm[-1]["rss_mb"] - warm[0]["rss_mb"]) / max(1, (warm[-1]["trials"] - warm[0]["trials"]) / 100)
    case = {
        "tracking": "sqlite" if tracking else "off",
        "n_trials": samples[-1]["trials"],
        "samples": samples,
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_end_mb": samples[-1]["rss_mb"],
        "growth_mb_per_100_trials": growth,
        "max_step_mb_per_100_trials": max(b["rss_mb"] - a["rss_mb"] for a, b in zip(warm, warm[1:], strict=False)),
    }
    print(
        f"  memory ({case['tracking']}): RSS {case['rss_start_mb']:.0f} -> {case['rss_end_mb']:.0f} MB over "
        f"{case['n_trials']} trials; {growth:.2f} MB per 100 trials after the first {every}",
        flush=True,
    )
    return case


# ---- report ----


def target(name: str, limit: str, measured: float | None, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": name, "limit": limit, "measured": measured, "met": met, "note": note}


def targets(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for case in report.get("overhead", []):
        if case["runner"] == "ray":
            out.append(target(
                f"ray s/trial, tracking {case['tracking']}", f"<= {TARGET_RAY_S_PER_TRIAL}",
                case["s_per_trial"], case["s_per_trial"] <= TARGET_RAY_S_PER_TRIAL,
            ))
        else:
            note = (
                "experiment=nb201_tabular ships with tracking off; with it on, every trial is an MLflow run "
                "(create_run, 3 log_batch, search_runs, get_run, set_terminated on SQLite)"
                if case["tracking"] != "off" else "~9 fsyncs per trial: the rate follows the disk's fsync time"
            )
            out.append(target(
                f"local trials/s, tracking {case['tracking']}", f">= {TARGET_LOCAL_TRIALS_PER_S}",
                case["trials_per_s"], case["trials_per_s"] >= TARGET_LOCAL_TRIALS_PER_S, note,
            ))
    scaling = report.get("scaling")
    if scaling:
        out.append(target(
            "scaling efficiency 1 -> 2 trials (throughput)", f">= {TARGET_EFFICIENCY}", scaling["efficiency"],
            scaling["efficiency"] >= TARGET_EFFICIENCY, "same candidates in both runs (search=random, same seed)",
        ))
    for case in report.get("memory", []):
        out.append(target(
            f"driver RSS growth per 100 trials, tracking {case['tracking']}", f"< {TARGET_MB_PER_100} MB",
            case["growth_mb_per_100_trials"], case["growth_mb_per_100_trials"] < TARGET_MB_PER_100,
        ))
    return out


def libraries() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("ray", "optuna", "mlflow", "torch", "hydra-core")}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "runtime.json"))
    ap.add_argument("--ray-trials", type=int, default=200)
    ap.add_argument("--local-trials", type=int, default=2000)
    ap.add_argument("--tracked-trials", type=int, default=200, help="trials of the runs with MLflow (sqlite) on")
    ap.add_argument("--scaling-trials", type=int, default=8)
    ap.add_argument("--scaling-repeats", type=int, default=2, help="pairs of 1- and 2-concurrent sweeps, in ABBA order")
    ap.add_argument("--merge", action="store_true", help="keep the sections of an existing --out that this run skips")
    ap.add_argument("--memory-trials", type=int, default=1000)
    ap.add_argument("--memory-every", type=int, default=100)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    # internal: the in-process memory run
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tracked", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--table", help=argparse.SUPPRESS)
    ap.add_argument("--out-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.memory_every, args.tracked, Path(args.table), Path(args.out_child))
        return 0

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    table = make_table(WORK / "nb201_all_cells.csv")
    report: dict[str, Any] = {
        "bench_command": [Path(sys.executable).name, *sys.argv],
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_before": loadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "libraries": libraries(),
        "method": __doc__,
    }
    if not args.skip_overhead:
        print("(a) platform overhead per trial (trivial table look-ups, search=random)", flush=True)
        report["overhead"] = [
            overhead_case(table, "local", args.local_trials, tracking=False),
            overhead_case(table, "local", args.tracked_trials, tracking=True),
            overhead_case(table, "ray", args.ray_trials, tracking=False),
            overhead_case(table, "ray", args.tracked_trials, tracking=True),
        ]
    if not args.skip_memory:
        print("(c) driver memory, local runner in-process", flush=True)
        report["memory"] = [
            memory_case(args.memory_trials, args.memory_every, tracking=False, table=table),
            memory_case(args.memory_trials, args.memory_every, tracking=True, table=table),
        ]
    if not args.skip_scaling:
        print("(b) scaling: default digits search, search=random seed=0, 1 vs 2 concurrent trials", flush=True)
        control_before = cpu_parallelism()
        runs = []
        for repeat in range(args.scaling_repeats):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)  # ABBA
            runs += [scaling_case(c, args.scaling_trials, 0, repeat) for c in order]
        control_after = cpu_parallelism()
        print(f"  control: two busy processes run at {control_before:.2f} / {control_after:.2f} of two free cores", flush=True)
        report["scaling"] = {
            "cpu_parallelism_control": {"before": control_before, "after": control_after},
            "repeats": args.scaling_repeats,
            **scaling_summary(runs),
        }
        s = report["scaling"]
        print(
            f"  efficiency {s['efficiency']:.2f} pooled over {args.scaling_repeats} repeats "
            f"(per repeat {', '.join(f'{e:.2f}' for e in s['efficiency_per_repeat'])}; compute "
            f"{s['compute_efficiency']:.2f}; a trial is {s['trial_slowdown_when_paired']:.2f}x slower when two run), "
            f"same candidates: {s['same_candidates']}",
            flush=True,
        )
    report["machine"]["loadavg_after"] = loadavg()
    if args.merge and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        skipped = {"overhead": args.skip_overhead, "memory": args.skip_memory, "scaling": args.skip_scaling}
        for section, was_skipped in skipped.items():
            if was_skipped and section in earlier:
                report[section] = earlier[section]
                report.setdefault("merged_from_earlier_run", []).append(section)
    report["targets"] = targets(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("targets:")
    for t in report["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']:.4g} (target {t['limit']})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
