"""Honest numeric formats: each format allowed or refused per (provider, device fingerprint), and the
files compress_onnx writes compute what the format's name says (real ORT sessions, real torch exports)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hwnas.evaluators.measure.formats import (
    INT4_COMPUTES,
    allowed_formats,
    check_formats,
    format_support,
    int8_has_vnni,
)
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.quantize import compress_onnx

X86_VNNI = {"cpu_model": "Xeon VNNI", "arch": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni"]}
X86_AVX_VNNI = {"arch": "x86_64", "flags": ["avx2", "avx_vnni"]}
X86_AVX2 = {"cpu_model": "Core AVX2", "arch": "x86_64", "flags": ["avx2", "fma"]}
ARM_DOT_FP16 = {"arch": "aarch64", "flags": ["asimd", "asimddp", "asimdhp", "fphp"]}
ARM_PLAIN = {"arch": "aarch64", "flags": ["asimd"]}  # e.g. a Cortex-A72 (Raspberry Pi 4)
GPU = {"arch": "x86_64", "flags": ["avx2"], "gpu": {"name": "NVIDIA H100", "driver": "550"}}


@pytest.mark.parametrize(
    ("fmt", "provider", "fingerprint", "ok"),
    [
        ("fp32", "cpu", X86_AVX2, True),
        ("fp32", "cuda", GPU, True),
        ("fp16", "cpu", X86_VNNI, False),  # Casts around float32 kernels
        ("fp16", "cpu", X86_AVX2, False),
        ("fp16", "cpu", ARM_PLAIN, False),
        ("fp16", "cpu", ARM_DOT_FP16, True),  # MLAS fp16 NEON conv/GEMM
        ("fp16", "cuda", GPU, True),
        ("int8", "cpu", X86_VNNI, True),
        ("int8", "cpu", X86_AVX2, True),
        ("int8", "cpu", ARM_PLAIN, True),
        ("int8", "cuda", GPU, False),  # DequantizeLinear + float conv on the CUDA EP
        ("int4", "cpu", X86_AVX2, True),
        ("int4", "cuda", GPU, True),
    ],
)
def test_rule(fmt, provider, fingerprint, ok):
    support = format_support(fmt, provider, fingerprint)
    assert support.ok is ok
    assert bool(support.computes) is ok and bool(support.reason) is not ok


def test_int8_range_follows_the_fingerprint():
    assert int8_has_vnni(X86_VNNI) and int8_has_vnni(X86_AVX_VNNI) and int8_has_vnni(ARM_DOT_FP16)
    assert not int8_has_vnni(X86_AVX2) and not int8_has_vnni(ARM_PLAIN)
    assert "VNNI" in format_support("int8", "cpu", X86_VNNI).computes
    assert "full 8-bit" in format_support("int8", "cpu", X86_VNNI).computes
    assert "7-bit" in format_support("int8", "cpu", X86_AVX2).computes
    assert "dot product" in format_support("int8", "cpu", ARM_DOT_FP16).computes


def test_int4_is_named_for_what_it_is():
    assert format_support("int4", "cpu", X86_VNNI).computes == INT4_COMPUTES
    assert (
        "weight-only" in INT4_COMPUTES
        and "MatMulNBits" in INT4_COMPUTES
        and "convolutions fp32" in INT4_COMPUTES
    )


def test_allowed_formats_per_target():
    assert allowed_formats("cpu", X86_VNNI) == ["fp32", "int8", "int4"]
    assert allowed_formats("cpu", ARM_DOT_FP16) == ["fp32", "fp16", "int8", "int4"]
    assert allowed_formats("cuda", GPU) == ["fp32", "fp16", "int4"]


def test_check_formats_one_line_naming_format_target_reason_and_allowed():
    assert [s.fmt for s in check_formats(["fp32", "int8"], "cpu", X86_AVX2)] == ["fp32", "int8"]
    with pytest.raises(ValueError) as err:
        check_formats(["fp32", "fp16", "int8"], "cpu", X86_AVX2)
    message = str(err.value)
    assert "\n" not in message
    assert "quant='fp16' is refused on cpu (Core AVX2): " in message and "fp16 Conv/Gemm" in message
    assert message.endswith("allowed: fp32, int8, int4")
    with pytest.raises(
        ValueError, match=r"quant='int8' is refused on cuda .*CUDA EP.*; allowed: fp32, fp16, int4$"
    ):
        check_formats(["int8"], "cuda", GPU)


def test_unknown_format_and_provider():
    with pytest.raises(ValueError, match="allowed: fp32, fp16, int8, int4"):
        format_support("int2", "cpu", X86_AVX2)
    with pytest.raises(ValueError, match="allowed: cpu, cuda"):
        format_support("fp32", "tpu", X86_AVX2)


# -- real files ------------------------------------------------------------------------------------


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 48),
        nn.ReLU(),
        nn.Linear(48, 10),
    ).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    fp32 = export_onnx(tiny_net(), torch.zeros(1, 1, 8, 8), d / "fp32.onnx", opset=17)
    calibration = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    return d, fp32, calibration


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _conv_weight_ranges(path):
    """(min, max) of every int8 4-D initializer (the quantized conv weights)."""
    graph = onnx.load(str(path)).graph
    return [
        (int(a.min()), int(a.max()))
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
        for a in [onnx.numpy_helper.to_array(t)]
    ]


def test_int8_full_range_uses_8_bit_weights_and_reduced_7_bit(exported):
    d, fp32, calibration = exported
    full = compress_onnx(
        fp32, "int8", calibration, d / "full.onnx", int8_full_range=True, fingerprint=X86_VNNI
    )
    reduced = compress_onnx(fp32, "int8", calibration, d / "reduced.onnx", int8_full_range=False)
    full_ranges, reduced_ranges = _conv_weight_ranges(full), _conv_weight_ranges(reduced)
    assert full_ranges and reduced_ranges
    # Symmetric per-channel: the largest weight of a layer maps to -127 or 127 (8 bits) or to +-64 (7 bits).
    assert all(max(-lo, hi) == 127 for lo, hi in full_ranges)
    assert all(-64 <= lo and hi <= 64 and max(-lo, hi) >= 63 for lo, hi in reduced_ranges)
    x = calibration[:16]
    ref = _run(fp32, x)
    for path in (full, reduced):
        assert np.abs(_run(path, x) - ref).max() < 0.05 * np.abs(ref).max()


def test_int8_runs_as_integer_kernels_on_the_cpu_ep(exported, tmp_path):
    d, fp32, calibration = exported
    path = compress_onnx(fp32, "int8", calibration, d / "int8.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    # The two inner convs fused into QLinearConv; no DequantizeLinear feeds a float Conv.
    assert ops.count("QLinearConv") == 2, ops


def test_int4_is_matmulnbits_and_close_to_fp32_on_the_cpu_ep(exported):
    d, fp32, calibration = exported
    path = compress_onnx(fp32, "int4", calibration, d / "int4.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops and ops.count("Conv") == 3
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert {a.name: a.i for a in nbits[0].attribute if a.name in ("K", "N", "bits")} == {
        "K": 32,
        "N": 48,
        "bits": 4,
    }
    x = calibration[:16]
    ref, out = _run(fp32, x), _run(path, x)
    assert out.shape == ref.shape
    # int4 weights in blocks of 32: a few percent of the logits' scale, and the same answers.
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_int4_refused_without_a_linear_layer(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    fp32 = export_onnx(net, torch.zeros(1, 1, 8, 8), tmp_path / "conv.onnx", opset=17)
    with pytest.raises(ValueError, match="no linear layer"):
        compress_onnx(fp32, "int4", np.zeros((1, 1, 8, 8), np.float32), tmp_path / "int4.onnx")


def test_fp16_on_cpu_is_refused_in_one_line(exported, tmp_path):
    d, fp32, calibration = exported
    with pytest.raises(ValueError) as err:
        compress_onnx(fp32, "fp16", calibration, tmp_path / "fp16.onnx", provider="cpu", fingerprint=X86_VNNI)
    assert "\n" not in str(err.value) and "quant='fp16' is refused on cpu" in str(err.value)
    assert not (tmp_path / "fp16.onnx").exists()


def test_int8_on_cuda_is_refused(exported, tmp_path):
    d, fp32, calibration = exported
    with pytest.raises(ValueError, match="quant='int8' is refused on cuda"):
        compress_onnx(fp32, "int8", calibration, tmp_path / "int8.onnx", provider="cuda", fingerprint=GPU)


def test_fp16_for_cuda_is_written_and_valid(exported, tmp_path):
    # Made here for a CUDA target; where this ONNX Runtime has no CUDA EP, checked on the CPU EP.
    d, fp32, calibration = exported
    path = compress_onnx(fp32, "fp16", calibration, tmp_path / "fp16.onnx", provider="cuda", fingerprint=GPU)
    graph = onnx.load(str(path)).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    x = calibration[:4]
    assert np.abs(_run(path, x) - _run(fp32, x)).max() < 0.05 * np.abs(_run(fp32, x)).max()
