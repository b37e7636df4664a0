"""scripts/bench_samplers.py: the per-trial sampler cost it reports comes from real studies of the asked size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from script_module import load_script


def test_free_objectives_are_a_function_of_the_candidate() -> None:
    bench = load_script("bench_samplers")
    a = {"edge1_0": "none", "edge2_0": "skip_connect"}
    b = {"edge1_0": "none", "edge2_0": "nor_conv_3x3"}
    assert bench.free_objectives(a) == bench.free_objectives(dict(reversed(list(a.items()))))
    assert bench.free_objectives(a) != bench.free_objectives(b)


def test_window_stats() -> None:
    bench = load_script("bench_samplers")
    seconds = np.array([0.001] * 10 + [0.003] * 10)
    assert bench.window_stats(seconds, 20, 10)["median_ms"] == 3.0
    assert bench.window_stats(seconds, 10, 10)["median_ms"] == 1.0
    assert bench.window_stats(seconds, 21, 10) is None


def test_small_run_writes_checks(tmp_path: Path) -> None:
    out = tmp_path / "samplers.json"
    bench = load_script("bench_samplers")
    report = bench.main(["--samplers", "random", "evolution", "--spaces", "nb201", "--trials", "30", "--window", "10", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for name in ("random", "evolution"):
        result = report["results"][name]["nb201"]
        assert result["trials"] == 30
        assert set(result["per_trial"]) == {"30"}  # checkpoints beyond the study are left out
        assert result["per_trial"]["30"]["median_ms"] > 0
    assert set(report["checks"]) == {f"{n}/nb201: median ms per trial at 30 < 50" for n in ("random", "evolution")}
