"""The timing protocol on real ONNX Runtime sessions of real exported models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from hwnas.evaluators.measure.fingerprint import device_fingerprint, fingerprint_id
from hwnas.evaluators.measure.protocol import (
    Measurement,
    MeasureProtocol,
    make_session,
    measure_file,
    round_stats,
    runnable_tasks,
    time_session,
)
from hwnas.evaluators.onnx_export import export_onnx

FAST = MeasureProtocol(warmup_runs=3, warmup_s=0.01, block_s=0.0005, blocks=6, max_rounds=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("proto")
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    # ~40x the multiply-adds of `small` on a 4x larger image: must be timed clearly slower.
    big = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return {
        "small": export_onnx(small, torch.zeros(1, 1, 8, 8), tmp / "small.onnx", opset=17),
        "big": export_onnx(big, torch.zeros(1, 1, 16, 16), tmp / "big.onnx", opset=17),
    }


def relu_model(shape: list, tmp: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp / f"relu_{'_'.join(map(str, shape))}.onnx"
    onnx.save(model, path)
    return path


def test_protocol_round_trips_and_key():
    p = MeasureProtocol(blocks=12, block_s=0.003, graph_optimization="basic")
    assert MeasureProtocol.from_dict(p.to_dict()) == p
    q = p.query()
    assert all(isinstance(v, str) for v in q.values())
    assert MeasureProtocol.from_dict(q) == p  # HTTP query parameters come back as strings
    assert p.key() == MeasureProtocol.from_dict(q).key() and len(p.key()) == 16
    assert p.key() != MeasureProtocol(blocks=13, block_s=0.003, graph_optimization="basic").key()
    assert MeasureProtocol(block_s=1).block_s == 1.0 and MeasureProtocol(block_s=1).key() == MeasureProtocol(
        block_s=1.0).key()


@pytest.mark.parametrize("key, value", [
    ("blocks", 2), ("blocks", "many"), ("threads", 0), ("threads", True), ("batch_size", 1.5),
    ("block_s", 0), ("block_s", "nan"), ("warmup_s", -1), ("cv_threshold", 0), ("max_rounds", 1000),
    ("graph_optimization", "max"), ("colour", 1),
])
def test_bad_protocol_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key) as info:
        MeasureProtocol.from_dict({key: value})
    assert "\n" not in str(info.value) and "allowed" in str(info.value)


def test_measurement_follows_the_protocol(models):
    fp = device_fingerprint("cpu")
    m = measure_file(models["small"], "cpu", FAST, fingerprint=fp)
    assert (m.provider, m.intra_op_threads, m.input_shape, m.output_shape) == (
        "CPUExecutionProvider", 1, (1, 1, 8, 8), (1, 10))
    # At most max_rounds quiet rounds; rounds disturbed by other work (the rest of the suite beside this
    # test) are repeated within quiet_wait_s and counted too, so only a lower bound holds on a busy machine.
    assert m.n_blocks == 6 and m.n_runs == 6 * m.runs_per_block and m.rounds >= 1
    # k was calibrated so that a block lasts about block_s (0.5 ms); a 1-run block would mean no calibration.
    assert m.runs_per_block > 1 and m.runs_per_block * m.median_ms > 0.25 * FAST.block_s * 1000
    assert 0 < m.median_ms <= m.p90_ms <= m.p99_ms and m.mean_ms > 0 and m.std_ms >= 0
    assert m.cv >= 0 and 0 < m.resolution_pct < 100
    assert m.protocol == FAST.to_dict() and m.device_id == fingerprint_id(fp) and m.fingerprint == fp
    assert (m.energy_j, m.energy_source, m.source) == (None, "none", "measured")


def test_measurement_dict_round_trip_and_validation(models):
    m = measure_file(models["small"], "cpu", FAST)
    d = json.loads(json.dumps(m.to_dict()))
    assert Measurement.from_dict(d) == m
    for bad in ({**d, "median_ms": "fast"}, {**d, "n_runs": 1.5}, {**d, "n_runs": True},
                {**d, "input_shape": ["a"]}, {**d, "extra": 1}):
        with pytest.raises(ValueError, match="measurement") as info:
            Measurement.from_dict(bad)
        assert "\n" not in str(info.value)
    missing = dict(d)
    del missing["p99_ms"]
    with pytest.raises(ValueError, match="p99_ms"):
        Measurement.from_dict(missing)


def test_rounds_repeat_while_the_spread_is_high(models):
    # No CV is below 1e-4 on a real machine: every round runs; with a huge threshold, one round.
    strict = measure_file(models["small"], "cpu", MeasureProtocol(**{**FAST.to_dict(), "cv_threshold": 1e-4}))
    assert strict.rounds == FAST.max_rounds
    loose = measure_file(models["small"], "cpu", MeasureProtocol(**{**FAST.to_dict(), "cv_threshold": 10.0}))
    assert loose.rounds == 1


def test_a_bigger_model_ranks_slower(models):
    small = measure_file(models["small"], "cpu", FAST)
    big = measure_file(models["big"], "cpu", FAST)
    assert big.median_ms > 3 * small.median_ms
    # Blocks last about the same time whatever the model: fewer runs per block for the bigger one.
    assert big.runs_per_block < small.runs_per_block


def test_session_settings_and_bytes(models):
    p = MeasureProtocol(**{**FAST.to_dict(), "threads": 2, "batch_size": 3, "graph_optimization": "disabled"})
    session = make_session(models["small"].read_bytes(), "cpu", p)
    opts = session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert str(opts.graph_optimization_level).endswith("ORT_DISABLE_ALL")
    m = time_session(session, p, fingerprint=device_fingerprint("cpu"))
    assert m.input_shape == (3, 1, 8, 8) and m.output_shape == (3, 10) and m.intra_op_threads == 2


def test_dims_that_are_not_fixed_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dim 2") as info:
        measure_file(relu_model(["batch", 3, "h", 4], tmp_path), "cpu", FAST)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="batch dim 1 is fixed"):
        measure_file(relu_model([1, 3], tmp_path), "cpu", MeasureProtocol(batch_size=2))
    m = measure_file(relu_model([2, 3], tmp_path), "cpu", MeasureProtocol(**{**FAST.to_dict(), "batch_size": 2}))
    assert m.input_shape == (2, 3)


def test_unknown_or_missing_provider():
    with pytest.raises(ValueError, match="provider"):
        make_session(b"", "tpu", FAST)


class CountingMeter:
    """A meter with a known answer (this VM has no RAPL or NVML counter): +2 J per read."""

    source = "rapl"

    def __init__(self) -> None:
        self.j = 0.0

    def read_j(self) -> float:
        self.j += 2.0
        return self.j


def test_energy_is_read_around_the_kept_round(models):
    p = MeasureProtocol(**{**FAST.to_dict(), "batch_size": 2, "cv_threshold": 10.0})
    m = measure_file(models["small"], "cpu", p, energy=CountingMeter())
    assert m.energy_source == "rapl"
    assert m.energy_j == pytest.approx(2.0 / (m.n_runs * 2))  # joules per inference (per image)


def test_round_stats_median_ignores_preempted_runs():
    k, blocks = 50, 10
    runs = np.full(k * blocks, 30_000, dtype=np.int64)  # 30 µs each ...
    runs[::7] = 3_000_000  # ... and every 7th run preempted for 3 ms
    stats = round_stats(np.concatenate([[0], np.cumsum(runs)]), k)
    assert stats["median_ms"] == pytest.approx(0.03) and stats["p99_ms"] == pytest.approx(3.0)
    assert stats["n_runs"] == 500 and stats["n_blocks"] == 10 and stats["mean_ms"] > 0.4


def test_a_busy_neighbour_marks_the_round_disturbed_and_a_quiet_machine_does_not(models):
    """A real process spinning on this machine while a file is timed: the protocol sees other runnable
    tasks at its block boundaries, waits up to quiet_wait_s for them to go, then flags the figure."""
    import subprocess
    import sys
    import time

    if runnable_tasks() is None:
        pytest.skip("no /proc/loadavg on this system")
    protocol = MeasureProtocol(blocks=10, block_s=0.002, quiet_wait_s=0.3)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)  # the spinners are running before the timing starts
        busy = measure_file(models["small"], "cpu", protocol)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy.disturbed and busy.others_share is not None and busy.others_share > 0.5
    assert busy.rounds >= 2  # it waited and tried again before giving up
    # The check off: the same neighbours never mark a round.
    off = MeasureProtocol(blocks=10, block_s=0.002, quiet_share=1.0)
    assert not measure_file(models["small"], "cpu", off).disturbed
    assert Measurement.from_dict(busy.to_dict()) == busy
