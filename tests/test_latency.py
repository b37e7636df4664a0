from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ort_has_cuda
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from hwnas.evaluators.latency import LatencyTarget, LocalTarget, Measurement, Target, measure_latency
from hwnas.evaluators.measure.fingerprint import fingerprint_id
from hwnas.evaluators.onnx_export import export_onnx

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
SHAPE = (1, 16, 16)


def target(**overrides) -> LatencyTarget:
    kwargs = dict(name="cpu-test", provider="cpu", threads=1, batch_size=1, warmup=3, repeats=8, block_ms=0.5)
    kwargs.update(overrides)
    return LatencyTarget(**kwargs)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return export_onnx(model, torch.zeros(1, *SHAPE), tmp_path_factory.mktemp("lat") / "m.onnx", opset=17)


def test_stats_are_positive_and_ordered(onnx_file):
    stats = measure_latency(onnx_file, target(), SHAPE)
    assert isinstance(stats, Measurement) and stats.source == "measured"
    # repeats = timed blocks per round; each block is runs_per_block consecutive runs.
    assert stats.n_blocks == 8 and stats.n == stats.n_runs == 8 * stats.runs_per_block
    assert 0 < stats.median_ms and 0 < stats.p90_ms <= stats.p99_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0 and stats.cv >= 0 and stats.resolution_pct > 0
    assert 1 <= stats.rounds <= 3
    assert stats.protocol == target().protocol().to_dict()
    assert stats.device_id == fingerprint_id(target().fingerprint())


def test_input_shape_is_checked_against_the_model(onnx_file):
    with pytest.raises(ValueError, match="input_shape") as info:
        measure_latency(onnx_file, target(), (3, 16, 16))
    assert "\n" not in str(info.value)


def test_old_run_folder_keys_still_build():
    # Run folders written before issue 11 hold only these keys under `hardware`.
    old = {"_target_": "hwnas.evaluators.latency.LatencyTarget", "name": "cpu-1thread", "provider": "cpu",
           "threads": 1, "batch_size": 1, "warmup": 10, "repeats": 50}
    t = instantiate(OmegaConf.create(old))
    assert isinstance(t, LocalTarget) and isinstance(t, Target)
    assert t.protocol().blocks == 50 and t.protocol().warmup_runs == 10 and t.isolate and t.affinity == "none"


def test_measurement_is_taken_under_the_exclusive_lock(onnx_file, tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    monkeypatch.setenv("HWNAS_LOCK_DIR", str(tmp_path))
    # Another process computing holds a slot for 1 s: the isolated measurement starts after it ends.
    code = ("import time\nfrom hwnas.evaluators.measure.lock import compute_slot\n"
            f"with compute_slot():\n    open({str(tmp_path / 'in')!r}, 'w').write('1')\n    time.sleep(1.0)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    while not (tmp_path / "in").exists():
        time.sleep(0.01)
    start = time.monotonic()
    measure_latency(onnx_file, target(), SHAPE)
    waited = time.monotonic() - start
    assert proc.wait(30) == 0
    assert waited >= 0.7
    # Not isolated: it does not wait. The slot is held for 8 s here, and the measurement must end while it is
    # still held (a wall-clock bound flakes on a busy machine, where disturbed rounds are retried for up to
    # quiet_wait_s = 3 s).
    hold = code.replace("'in'", "'in2'").replace("/in", "/in2").replace("time.sleep(1.0)", "time.sleep(8.0)")
    proc = subprocess.Popen([sys.executable, "-c", hold])
    while not (tmp_path / "in2").exists():
        time.sleep(0.01)
    measure_latency(onnx_file, target(isolate=False), SHAPE)
    assert proc.poll() is None  # measured while the other process still held its slot
    assert proc.wait(30) == 0


# No test compares two timings here (a ratio of medians flakes on a loaded machine): how stable the
# latency is on a quiet machine is reported by scripts/bench_sweep.py (ABBA retiming of the front).
def test_two_measurements_follow_the_same_protocol(onnx_file):
    a = measure_latency(onnx_file, target(), SHAPE)
    b = measure_latency(onnx_file, target(), SHAPE)
    assert (a.provider, a.intra_op_threads, a.input_shape, a.output_shape, a.n_blocks) == (
        b.provider, b.intra_op_threads, b.input_shape, b.output_shape, b.n_blocks
    ) == ("CPUExecutionProvider", 1, (1, *SHAPE), (1, 10), 8)
    assert a.protocol == b.protocol and a.device_id == b.device_id
    assert all(0 < s.median_ms <= s.p90_ms and s.std_ms >= 0 for s in (a, b))


@pytest.mark.parametrize(("batch_size", "threads"), [(8, 2), (3, 1), (1, 2)])
def test_batch_size_and_threads_are_honoured(onnx_file, batch_size, threads):
    stats = measure_latency(onnx_file, target(batch_size=batch_size, threads=threads, warmup=1, repeats=3), SHAPE)
    # The session ran with the configured intra-op thread budget (read back from the session) ...
    assert stats.intra_op_threads == threads
    assert stats.provider == "CPUExecutionProvider"
    # ... on inputs of the configured batch size, which the model really processed (one row of
    # logits per image in the last timed run's output).
    assert stats.input_shape == (batch_size, *SHAPE)
    assert stats.output_shape == (batch_size, 10)
    assert stats.n_blocks == 3 and stats.median_ms > 0


@pytest.mark.skipif(ort_has_cuda(), reason="this onnxruntime has the CUDA EP: a cuda target is not refused here")
def test_cuda_target_without_cuda_ep_fails_clearly(onnx_file):
    cuda = target(name="cuda", provider="cuda")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider") as info:
        cuda.check_available()
    assert "CPUExecutionProvider" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        measure_latency(onnx_file, cuda, SHAPE)


@pytest.mark.skipif(not ort_has_cuda(), reason="needs onnxruntime with the CUDA EP and a GPU")
def test_cuda_target_measures_on_the_gpu(onnx_file):
    cuda = target(name="cuda", provider="cuda", batch_size=4)
    cuda.check_available()
    stats = measure_latency(onnx_file, cuda, SHAPE)
    assert stats.provider == "CUDAExecutionProvider"
    assert stats.input_shape == (4, *SHAPE) and stats.output_shape == (4, 10)
    assert 0 < stats.median_ms <= stats.p90_ms


def test_gpu_provider_is_rejected_with_advice():
    with pytest.raises(ValueError, match="'cuda'"):
        target(provider="gpu")


@pytest.mark.parametrize(
    "field, value",
    [("provider", "tpu"), ("threads", 0), ("batch_size", 0), ("warmup", -1), ("repeats", 2), ("name", ""),
     ("block_ms", 0), ("block_ms", 20_000), ("cv_threshold", -0.1), ("max_rounds", 0), ("isolate", "yes"),
     ("affinity", "cores"), ("threads", True)],
)
def test_bad_fields(field, value):
    with pytest.raises(ValueError, match=field) as info:
        target(**{field: value})
    assert "\n" not in str(info.value)


# conf/hardware keys that configure how latencies are obtained (search.config.PLAN_KEYS), not the target.
PLAN_KEYS = ("cache", "predictor", "prescreen")


def load_target(name: str):
    node = OmegaConf.load(CONF / name)
    for key in PLAN_KEYS:
        if key in node:
            del node[key]  # unresolved: `cache` interpolates the run folder
    return instantiate(node)


def test_cpu_config_defaults():
    t = load_target("cpu.yaml")
    assert isinstance(t, LatencyTarget)
    assert (t.provider, t.threads, t.batch_size) == ("cpu", 1, 1)
    p = t.protocol()
    assert (p.threads, p.batch_size, p.warmup_runs, p.graph_optimization) == (1, 1, t.warmup, "all")
    assert p.blocks == t.repeats and p.block_s == t.block_ms / 1000 and t.isolate
    t.check_available()


def test_cuda_config_builds():
    t = load_target("cuda.yaml")
    assert t.provider == "cuda"


def test_affinity_auto_pins_while_timing_and_restores(onnx_file):
    import os

    from hwnas.evaluators.measure.local import pinned

    before = os.sched_getaffinity(0)
    with pinned(1) as chosen:
        assert chosen is not None and len(chosen) == 1 and os.sched_getaffinity(0) == set(chosen)
        assert set(chosen) <= before
    assert os.sched_getaffinity(0) == before
    stats = measure_latency(onnx_file, target(affinity="auto", threads=1), SHAPE)
    assert stats.median_ms > 0 and os.sched_getaffinity(0) == before
