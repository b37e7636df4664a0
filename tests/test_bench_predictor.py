"""scripts/bench_predictor: the timing loop's clean-round logic, the per-(space, stand-in) raw files, the
usable-record rule (current and first-version records), and the ort-noopt stand-in on one real network."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hwnas.scripts import bench_predictor as b


def test_measure_pair_keeps_the_lowest_clean_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(b, "BLOCKS", 5)
    monkeypatch.setattr(b, "BLOCK_S", 0.001)
    monkeypatch.setattr(b, "WARMUP_S", 0.005)

    def busy(seconds: float):
        def fn() -> None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return fn

    out = b.measure_pair(busy(0.0002), busy(0.0005))
    assert out["rounds"] >= b.ROUNDS
    assert 0.15 < out["host_ms"] < out["standin_ms"] and out["standin_ms"] > 0.4
    for name in ("host", "standin"):
        clean = [r for r in out[f"{name}_rounds_ms"] if r is not None]
        assert out[f"{name}_ms"] == pytest.approx(min(clean), abs=1e-5) and out[f"{name}_clean_rounds"] == len(clean)
        assert out[f"{name}_spread"] is None or out[f"{name}_spread"] >= 1.0


def test_sleeping_is_not_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(b, "BLOCKS", 4)
    r = b.timed_round(lambda: time.sleep(0.001), 2)  # wall time without CPU time: what preemption looks like
    assert r["ms"] is None and r["clean_blocks"] == 0 and r["cpu_share"] < 0.5


def test_raw_files_per_space_and_standin(tmp_path: Path) -> None:
    assert b.raw_path("nb201", "ort-noopt", tmp_path) != b.raw_path("nb201", "pytorch-eager", tmp_path)
    legacy = {"arch": "a", "host_rounds_ms": [1.0, 1.1], "standin_rounds_ms": [2.0, 2.1]}
    new = {"arch": "b", "host_spread": 1.01, "standin_spread": 1.02}
    b.legacy_raw_path("nb201", tmp_path).write_text(json.dumps(legacy) + "\n")
    b.raw_path("nb201", "pytorch-eager", tmp_path).write_text(json.dumps(new) + "\n" + '{"arch": "torn"')
    assert set(b.load_standin("nb201", "pytorch-eager", tmp_path)) == {"a", "b"}  # the torn line is skipped
    assert b.load_standin("nb201", "ort-noopt", tmp_path) == {}
    assert b.usable(legacy) and b.usable(new)
    assert not b.usable({**new, "standin_spread": None}) and not b.usable({**new, "host_spread": 1.5})
    assert not b.usable({**legacy, "host_rounds_ms": [1.0, 1.5]})


def test_ort_noopt_standin_on_a_real_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hwnas.evaluators.measure.features import FEATURES_VERSION

    monkeypatch.setattr(b, "BLOCKS", 5)
    (arch, candidate), = b.macro_candidates(1, 0)
    r = b.measure_network("macro_cnn", candidate, tmp_path, "ort-noopt")
    assert r["standin"] == "ort-noopt" and r["features_version"] == FEATURES_VERSION
    assert r["host_ms"] > 0 and r["standin_ms"] > r["host_ms"]  # no fusion, one kernel per node: slower
    assert r["features"]["nodes_free"] > 0 or r["features"]["nodes_activation"] > 0
