from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import ort_has_cuda
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from hwnas.evaluators.latency import LatencyTarget, measure_latency
from hwnas.evaluators.onnx_export import export_onnx

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
SHAPE = (1, 16, 16)


def target(**overrides) -> LatencyTarget:
    kwargs = dict(name="cpu-test", provider="cpu", threads=1, batch_size=1, warmup=3, repeats=30)
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
    assert stats.n == 30
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0


# No test compares two timings here (a ratio of medians flakes on a loaded machine): how stable the
# latency is on a quiet machine is reported by scripts/bench_sweep.py (ABBA retiming of the front).
def test_two_measurements_follow_the_same_protocol(onnx_file):
    a = measure_latency(onnx_file, target(), SHAPE)
    b = measure_latency(onnx_file, target(), SHAPE)
    assert (a.provider, a.intra_op_threads, a.input_shape, a.output_shape, a.n) == (
        b.provider, b.intra_op_threads, b.input_shape, b.output_shape, b.n
    ) == ("CPUExecutionProvider", 1, (1, *SHAPE), (1, 10), 30)
    assert all(0 < s.median_ms <= s.p90_ms and s.std_ms >= 0 for s in (a, b))


@pytest.mark.parametrize(("batch_size", "threads"), [(8, 2), (3, 1), (1, 2)])
def test_batch_size_and_threads_are_honoured(onnx_file, batch_size, threads):
    stats = measure_latency(onnx_file, target(batch_size=batch_size, threads=threads, warmup=1, repeats=2), SHAPE)
    # The session ran with the configured intra-op thread budget (read back from the session) ...
    assert stats.intra_op_threads == threads
    assert stats.provider == "CPUExecutionProvider"
    # ... on inputs of the configured batch size, which the model really processed (one row of
    # logits per image in the last timed run's output).
    assert stats.input_shape == (batch_size, *SHAPE)
    assert stats.output_shape == (batch_size, 10)
    assert stats.n == 2 and stats.median_ms > 0


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
    [("provider", "tpu"), ("threads", 0), ("batch_size", 0), ("warmup", -1), ("repeats", 0), ("name", "")],
)
def test_bad_fields(field, value):
    with pytest.raises(ValueError, match=field) as info:
        target(**{field: value})
    assert "\n" not in str(info.value)


def test_cpu_config_defaults():
    t = instantiate(OmegaConf.load(CONF / "cpu.yaml"))
    assert isinstance(t, LatencyTarget)
    assert dataclasses.astuple(t)[1:] == ("cpu", 1, 1, 10, 50)
    t.check_available()


def test_cuda_config_builds():
    t = instantiate(OmegaConf.load(CONF / "cuda.yaml"))
    assert t.provider == "cuda"
