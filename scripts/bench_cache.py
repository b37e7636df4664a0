"""Cache hits on a sweep that revisits candidates: the same experiment run twice against a loopback agent.

    .venv/bin/python -m hwnas.scripts.bench_cache [--out results/bench/cache.json] [--trials 8] [-- hwnas overrides ...]

Starts one `hwnas-agent` on loopback (a real process, a real token), then runs the default search twice
with `hardware=remote` into two run folders of one experiment folder (so both use its
latency_cache.sqlite). The second sweep proposes the same candidates (same seed) and trains them to
byte-identical files: every latency should come from the cache, and the agent should see no request.
Reports, per sweep, the agent's measurement requests (from its log), cache hits (`latency_cached`),
the latency step's seconds per trial, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hwnas.agent.launch import start_agent
from hwnas.scripts.sweep_run import machine, run_search, split_overrides, trial_rows

ROOT = Path.cwd()


def _sweep(run_dir: Path, url: str, trials: int, token: str, extra: Sequence[str]) -> dict[str, Any]:
    wall = run_search(run_dir, trials, ["hardware=remote", f"hardware.urls=[{url}]", *extra], ROOT,
                      env={"HWNAS_AGENT_TOKEN": token})
    rows = trial_rows(run_dir)
    done = [r for r in rows if r["status"] == "COMPLETE"]
    return {
        "run_dir": str(run_dir.relative_to(ROOT)), "wall_s": wall, "complete": len(done), "failed": len(rows) - len(done),
        "cache_hits": sum(int(r["metrics"]["latency_cached"]) for r in done),
        "latency_step_s_median": statistics.median(r["metrics"]["latency_s"] for r in done),
        "latency_ms": {r["arch_id"]: r["metrics"]["latency_ms"] for r in done},
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "cache.json")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args(argv)
    root = ROOT / "results" / "bench" / "cache_runs" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    token = secrets.token_hex(16)
    (root / "token").write_text(token)
    os.chmod(root / "token", 0o600)
    agent = start_agent(root / "token", log=root / "agent.log")
    try:
        sweeps = []
        for name in ("first", "again"):
            before = agent.log_text().count("POST /measure")
            result = _sweep(root / "exp" / name, agent.url, args.trials, token, extra)
            result["agent_measure_requests"] = agent.log_text().count("POST /measure") - before
            sweeps.append(result)
    finally:
        agent.stop(signal.SIGTERM)
    first, again = sweeps
    same = [a for a in first["latency_ms"] if a in again["latency_ms"]]
    out = {
        "command": "python -m hwnas.scripts.bench_cache " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "first": first, "again": again,
        "same_candidates": len(same),
        "identical_latency_from_cache": sum(first["latency_ms"][a] == again["latency_ms"][a] for a in same),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for name, s in (("first", first), ("again", again)):
        print(f"{name}: {s['complete']} trials, {s['agent_measure_requests']} agent measurements, {s['cache_hits']} cache hits, "
              f"latency step median {s['latency_step_s_median'] * 1000:.1f} ms, wall {s['wall_s']:.0f} s")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
