"""The pure computations of scripts/bench_sweep.py on a synthetic trial list (no sweep is run)."""

from __future__ import annotations

from typing import Any

import pytest
from script_module import load_script

from hwnas.spaces.candidate import arch_id, net_id

bench = load_script("bench_sweep")


def _cand(blocks: list[str], width: int = 32, ratio: float = 0.0, quant: str = "fp32") -> dict[str, Any]:
    c: dict[str, Any] = {"n_stages": len(blocks), "prune_ratio": ratio, "quant": quant}
    for i, b in enumerate(blocks, start=1):
        c.update({f"stage{i}.block": b, f"stage{i}.depth": 1, f"stage{i}.kernel": 3, f"stage{i}.width": width})
    return c


def _row(number: int, cand: dict[str, Any], finished_at: float, total_s: float, pareto: bool = False, latency: float = 1.0,
         status: str = "COMPLETE") -> dict[str, Any]:
    metrics = {} if status != "COMPLETE" else {
        "train_s": total_s * 0.75, "export_s": total_s * 0.25, "total_s": total_s,
        "latency_ms": latency, "latency_p90_ms": latency * 1.1, "val_accuracy": 0.9, "model_bytes": 1000.0,
    }
    return {"number": number, "status": status, "candidate": cand, "arch_id": arch_id(cand), "net_id": net_id(cand),
            "finished_at": finished_at, "metrics": metrics, "pareto": pareto, "artifact": f"/x/{number}.onnx"}


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    conv = _cand(["conv", "conv"], width=64)
    dw = _cand(["dwsep", "ir6"], ratio=0.25, quant="int8")
    mixed = _cand(["conv", "ir3"], quant="int8")
    return [
        _row(0, conv, finished_at=110.0, total_s=10.0, pareto=True, latency=2.0),              # fp32 on the front
        _row(1, {**conv, "quant": "int8"}, finished_at=118.0, total_s=12.0, latency=1.0),      # its int8 twin, off the front
        _row(2, dw, finished_at=125.0, total_s=5.0, pareto=True, latency=0.5),                 # int8 on the front, no fp32 twin
        _row(3, mixed, finished_at=130.0, total_s=0.0, status="FAILED"),
        _row(4, {**conv, "quant": "fp16"}, finished_at=140.0, total_s=8.0, pareto=True),       # same net + ratio as trial 0
    ]


def test_platform_overhead_is_the_idle_share_of_paid_slot_time() -> None:
    assert bench.platform_overhead(90.0, 50.0, 2) == pytest.approx(0.10)
    assert bench.platform_overhead(100.0, 50.0, 2) == pytest.approx(0.0)
    assert bench.platform_overhead(0.0, 10.0, 1) == pytest.approx(1.0)


@pytest.mark.parametrize(("compute", "elapsed", "conc"), [(1.0, 0.0, 2), (1.0, 10.0, 0), (1.0, 10.0, 1.5), (-1.0, 10.0, 1), (1.0, 10.0, True)])
def test_platform_overhead_rejects_bad_input(compute: float, elapsed: float, conc: Any) -> None:
    with pytest.raises(ValueError):
        bench.platform_overhead(compute, elapsed, conc)


def test_step_totals_sum_complete_trials_only(rows: list[dict[str, Any]]) -> None:
    totals = bench.step_totals(rows)
    assert totals["total_s"] == pytest.approx(35.0)
    assert totals["train_s"] == pytest.approx(35.0 * 0.75)
    assert totals["export_s"] == pytest.approx(35.0 * 0.25)
    assert list(totals) == ["train_s", "export_s", "total_s"]  # pipeline order, total last


def test_sweep_window_runs_from_first_start_to_last_end(rows: list[dict[str, Any]]) -> None:
    start, end = bench.sweep_window(rows)
    assert start == pytest.approx(100.0)  # trial 0: 110 - 10
    assert end == pytest.approx(140.0)


def test_sweep_figures_put_it_together(rows: list[dict[str, Any]]) -> None:
    fig = bench.sweep_figures(rows, wall_s=60.0, start_epoch=90.0, concurrency=2)
    assert fig["trials"] == 5 and fig["failed"] == 1 and fig["front_size"] == 3
    assert fig["sweep_s"] == pytest.approx(40.0)
    assert fig["startup_s"] == pytest.approx(10.0)
    assert fig["after_last_trial_s"] == pytest.approx(10.0)
    assert fig["trials_per_minute"] == pytest.approx(5.0)
    assert fig["overhead_vs_wall"] == pytest.approx(1 - 35.0 / 120.0)
    assert fig["overhead_vs_sweep_phase"] == pytest.approx(1 - 35.0 / 80.0)


def test_sweep_window_needs_a_complete_trial() -> None:
    with pytest.raises(ValueError, match="rows"):
        bench.sweep_window([_row(0, _cand(["conv"]), 1.0, 0.0, status="FAILED")])


def test_compression_pairs_one_per_front_architecture_and_reuse_exact_trials(rows: list[dict[str, Any]]) -> None:
    pairs = bench.compression_pairs(rows)
    assert [(p["from_trial"], p["prune_ratio"], p["on_front"]) for p in pairs] == [(0, 0.0, True), (2, 0.25, True)]  # trial 4 repeats 0
    conv, dw = pairs
    assert conv["fp32"]["row"]["number"] == 0 and conv["int8"]["row"]["number"] == 1
    assert dw["int8"]["row"]["number"] == 2 and dw["fp32"]["row"] is None  # must be evaluated
    assert dw["fp32"]["candidate"]["quant"] == "fp32" and dw["fp32"]["candidate"]["prune_ratio"] == 0.25
    assert net_id(dw["fp32"]["candidate"]) == net_id(dw["int8"]["candidate"]) == rows[2]["net_id"]


def test_compression_pairs_over_all_trials_put_the_front_first(rows: list[dict[str, Any]]) -> None:
    pairs = bench.compression_pairs(rows, front_only=False)
    # trial 1 is trial 0's net and ratio, so nothing new; the failed trial 3 is never compared
    assert [(p["from_trial"], p["on_front"]) for p in pairs] == [(0, True), (2, True)]
    extra = _row(5, _cand(["conv"], ratio=0.5), finished_at=150.0, total_s=1.0)
    pairs = bench.compression_pairs([*rows, extra], front_only=False)
    assert [(p["from_trial"], p["on_front"]) for p in pairs] == [(0, True), (2, True), (5, False)]
    assert pairs[2]["fp32"]["row"]["number"] == 5 and pairs[2]["int8"]["row"] is None


def test_speedup_and_block_grouping() -> None:
    assert bench.speedup(3.0, 1.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="latency"):
        bench.speedup(1.0, 0.0)
    assert bench.block_kinds(_cand(["conv", "ir6"])) == ["conv", "ir6"]
    assert bench.block_mix(_cand(["conv", "conv"])) == "conv"
    assert bench.block_mix(_cand(["dwsep", "ir1"])) == "depthwise"
    assert bench.block_mix(_cand(["conv", "ir3"])) == "mixed"
    results = [
        {"blocks": ["conv", "conv"], "block_mix": "conv", "s": 2.0},
        {"blocks": ["conv", "ir3"], "block_mix": "mixed", "s": 1.0},
        {"blocks": ["dwsep"], "block_mix": "depthwise", "s": 0.5},
        {"blocks": ["conv"], "block_mix": "conv", "s": 3.0},
    ]
    groups = bench.speedups_by_block(results, "s")
    assert groups["mix=conv"]["median"] == pytest.approx(2.5) and groups["mix=conv"]["n"] == 2
    assert groups["has=conv"]["n"] == 3 and groups["has=conv"]["median"] == pytest.approx(2.0)  # counted once per net
    assert groups["has=dwsep"]["median"] == pytest.approx(0.5)
    assert bench.median_or_none([]) is None


def test_targets_state_each_limit_and_whether_it_is_met() -> None:
    fig = {"wall_s": 500.0, "overhead_vs_wall": 0.2}
    compare = {"median_speedup_retimed": 1.4, "median_speedup": 1.3, "int8_faster_count_retimed": 3, "front_architectures": 4,
               "int8_front_median_speedup_retimed": 0.9, "int8_front_points": 2}
    met = [t["met"] for t in bench.targets_section(fig, compare)]
    assert met == [True, False, False, True]  # the int8 points on the front, then every front architecture
    no_int8 = bench.targets_section(fig, {**compare, "int8_front_median_speedup_retimed": None, "int8_front_points": 0})
    assert no_int8[2]["met"] is None and no_int8[2]["measured"] is None
    assert bench.targets_section(fig, None)[2]["met"] is None
