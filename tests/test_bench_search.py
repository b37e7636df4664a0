"""scripts/bench_search.py on a 64-cell table: exact ratios where the answer is known, and its JSON."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from script_module import load_script

from hwnas.search.pareto import non_dominated_mask
from hwnas.spaces.nb201 import EDGE_KEYS, to_arch_string

OPS = ["nor_conv_1x1", "avg_pool_3x3"]  # 64 cells
BUDGETS = [8, 32, 64]
SAMPLERS = ["random", "nsga2", "evolution"]
SEEDS = 4  # enough for the medians and quartiles checked; 10 cost 40 s of make test




@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    cells = [dict(zip(EDGE_KEYS, ops, strict=True)) for ops in itertools.product(OPS, repeat=len(EDGE_KEYS))]
    # Accuracy rising with latency, plus noise: a front of several points, like the real table.
    latency = rng.uniform(0.5, 4.0, len(cells))
    frame = pd.DataFrame({
        "arch": [to_arch_string(c) for c in cells],
        "acc": 60 + 8 * np.log(latency) + rng.normal(0, 2, len(cells)),
        "lat": latency,
    })
    path = tmp_path_factory.mktemp("bench") / "table.csv"
    frame.to_csv(path, index=False)
    return path


def run(table: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = [
        "--table", str(table), "--accuracy", "acc", "--latency", "lat", "--samplers", *SAMPLERS,
        "--budgets", *map(str, BUDGETS), "--seeds", str(SEEDS), "--override", f"space.ops=[{','.join(OPS)}]",
        "--out", str(out), *extra,
    ]
    return load_script("bench_search").main(args)


@pytest.fixture(scope="module")
def result(table: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run(table, tmp_path_factory.mktemp("out") / "search.json")


def test_whole_space_gives_ratio_exactly_one(result: dict[str, Any]) -> None:
    assert len(result["runs"]) == len(SAMPLERS) * SEEDS
    for r in result["runs"]:
        assert r["evaluations"] == 64
        if r["distinct"] == 64:  # a sampler that repeats itself long enough makes the runner re-evaluate
            assert r["ratio"]["64"] == 1.0, r
            assert r["evals_to"]["0.998"] is not None and r["evals_to"]["0.998"] <= 64
    # Evolution retries (dozens of draws) against evaluated cells, so it covers the whole space.
    assert all(r["distinct"] == 64 for r in result["runs"] if r["sampler"] == "evolution")


def test_ratio_is_at_most_one_and_grows_with_budget(result: dict[str, Any]) -> None:
    for r in result["runs"]:
        ratios = [r["ratio"][str(b)] for b in BUDGETS]
        assert all(0.0 <= x <= 1.0 for x in ratios)
        assert ratios == sorted(ratios)
    # 8 of 64 cells rarely hold the whole front: the benchmark must be able to say "not there yet".
    assert min(r["ratio"]["8"] for r in result["runs"]) < 1.0


def test_true_front_matches_brute_force(table: Path, result: dict[str, Any]) -> None:
    frame = pd.read_csv(table)
    front = frame[non_dominated_mask(frame[["acc", "lat"]].to_numpy(), ["max", "min"])]
    assert result["true_front"]["size"] == len(front)
    nadir = [front["acc"].min(), front["lat"].max()]
    span = [front["acc"].max() - front["acc"].min(), front["lat"].max() - front["lat"].min()]
    assert result["true_front"]["reference"] == pytest.approx([nadir[0] - 0.01 * span[0], nadir[1] + 0.01 * span[1]])
    assert result["table"]["cells_in_table"] == 64 and result["table"]["cells_missing"] == 0


def test_json_has_the_documented_fields(table: Path, result: dict[str, Any]) -> None:
    out = Path(result["settings"]["table"])
    assert out == table
    assert set(result) == {"settings", "table", "true_front", "noise_ceiling", "summary", "checks", "runs"}
    settings = result["settings"]
    assert settings["budgets"] == BUDGETS and settings["accuracy"] == "acc" and settings["latency"] == "lat"
    assert settings["samplers"] == {name: {"seeds": SEEDS, "max_budget": 64} for name in SAMPLERS}
    assert set(result["true_front"]) == {"size", "hypervolume", "reference"}
    for name in SAMPLERS:
        s = result["summary"][name]
        for b in BUDGETS:
            entry = s["ratio"][str(b)]
            assert entry["n"] == SEEDS
            assert entry["min"] <= entry["q25"] <= entry["median"] <= entry["q75"] <= entry["max"]
        assert set(s["evals_to"]) == {"0.99", "0.998"} and s["evals_to"]["0.99"]["median"] <= 64
        assert s["seconds_per_trial"]["median"] > 0
    for r in result["runs"]:
        assert {"sampler", "seed", "evaluations", "distinct", "seconds", "seconds_per_trial", "ratio", "evals_to"} <= set(r)


def test_files_written(tmp_path: Path, table: Path) -> None:
    out = tmp_path / "b" / "search.json"
    result = run(table, out, "--latency-budget", "2.0")
    assert json.loads(out.read_text())["true_front"] == result["true_front"]
    assert out.with_suffix(".png").stat().st_size > 0
    frame = pd.read_csv(table)
    best = frame.loc[frame["lat"] <= 2.0, "acc"].max()
    assert result["table"]["best_feasible_accuracy"] == best
    for r in result["runs"]:
        regrets = [r["regret"][str(b)] for b in BUDGETS]
        if r["distinct"] == 64:
            assert regrets[-1] == 0.0  # every cell seen: the best feasible one too
        assert all(x is None or x >= 0 for x in regrets)
        assert [x for x in regrets if x is not None] == sorted((x for x in regrets if x is not None), reverse=True)
    assert set(result["summary"]["random"]["regret"]) == {str(b) for b in BUDGETS}


def test_noise_ceiling_takes_each_network_at_its_median(result: dict[str, Any]) -> None:
    # No two of the 64 test cells are the same network: the ceiling is the true front itself.
    assert result["noise_ceiling"]["networks"] == 64 and result["noise_ceiling"]["ratio"] == pytest.approx(1.0)
    bench = load_script("bench_search")
    identity = "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
    also_identity = "|none~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|"  # the conv reads a zero node
    conv = "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|"
    points = np.array([[70.0, 1.0], [72.0, 1.0], [80.0, 2.0]])
    reference = np.array([60.0, 3.0])
    true_hv = 12.0 * 1.0 + 20.0 * 1.0  # front (72, 1) and (80, 2) against (60, 3)
    ceiling = bench.noise_ceiling(points, [identity, also_identity, conv], reference, true_hv)
    assert ceiling["networks"] == 2
    assert ceiling["ratio"] == pytest.approx((11.0 * 1.0 + 20.0 * 1.0) / true_hv)  # identity at its median, 71
