"""The pure part of scripts/bench_runtime.py: pooling the 1- and 2-concurrent scaling runs."""

from __future__ import annotations

import pytest
from script_module import load_script

bench = load_script("bench_runtime")


def run(concurrency: int, phase_s: float, n: int = 8, compute_s: float | None = None, cands: tuple = ("a", "b")) -> dict:
    return {
        "max_concurrent": concurrency, "n_trials": n, "sweep_phase_s": phase_s,
        "compute_s": compute_s if compute_s is not None else phase_s * concurrency, "candidates": list(cands),
    }


def test_scaling_pools_repeats_by_their_seconds_not_by_averaging_ratios():
    # Repeat 0: 2 slots take 60 s for what 1 took 100 s (0.83); repeat 1: 40 s for 100 s (1.25).
    s = bench.scaling_summary([run(1, 100.0), run(2, 60.0), run(2, 40.0), run(1, 100.0)])
    assert s["efficiency_per_repeat"] == pytest.approx([100 / 60 / 2, 100 / 40 / 2])
    assert s["efficiency"] == pytest.approx((16 / 100) / (16 / 200) / 2)  # 200 s of 1 vs 100 s of 2 -> 1.0
    assert s["same_candidates"] is True


def test_scaling_notices_different_candidates_and_slower_paired_trials():
    s = bench.scaling_summary([run(1, 100.0, compute_s=100.0), run(2, 80.0, compute_s=150.0, cands=("a", "c"))])
    assert s["same_candidates"] is False
    assert s["trial_slowdown_when_paired"] == pytest.approx(1.5)
    assert s["efficiency"] == pytest.approx(100 / 80 / 2)
