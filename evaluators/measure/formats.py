"""Which numeric formats a target really computes in, and what its kernels do with each.

A format is offered on a target only where ONNX Runtime runs it with real kernels of that
precision, or it is named for exactly what it is (int4: weight-only linear layers). What was
checked, with ONNX Runtime 1.32 on an x86-64 CPU with AVX-512 VNNI (optimized graph and profiler,
scripts/bench_formats.py, results/bench/formats.json):

- fp16 on the CPU EP (x86-64): ORT has no fp16 Conv/Gemm kernel there; it inserts Casts and runs
  the float32 NCHWc kernels. Only ARM64 builds with fp16 vector arithmetic (MLAS_F16VEC_INTRINSICS,
  cpuinfo `asimdhp`) register fp16 convolution and GEMM kernels, so fp16 is allowed there alone.
- int8 (static QDQ) on the CPU EP: fused into QLinearConv / QLinearAdd / QLinearGlobalAveragePool
  (uint8 activations x int8 weights, integer GEMM). On the CUDA EP there is no such fusion: the QDQ
  graph runs as DequantizeLinear + float Conv + QuantizeLinear, slower than fp32 and not int8
  compute, so int8 is refused there (NVIDIA int8 needs TensorRT, which hwnas does not target).
- int4: MatMulNBits (CPU and CUDA kernels): int4 blockwise weights of the linear layers, unpacked
  inside the kernel, float32 arithmetic; convolutions stay float32.

Fingerprints are dicts as `hwnas.evaluators.measure.fingerprint.device_fingerprint` writes them;
only "arch", "flags" (and "cpu_model" for messages) are read here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hwnas.evaluators.measure.fingerprint import int8_has_vnni
from hwnas.spaces.candidate import FORMATS

PROVIDERS = ("cpu", "cuda")

INT4_COMPUTES = "int4 weight-only linear layers (MatMulNBits, fp32 arithmetic), convolutions fp32"


@dataclass(frozen=True)
class Support:
    """Whether `fmt` runs on a target with real kernels; `computes` says what they compute."""

    fmt: str
    provider: str
    ok: bool
    computes: str  # what the kernels compute (empty when refused)
    reason: str = ""  # why refused (empty when ok)


def _flags(fingerprint: Mapping[str, Any]) -> set[str]:
    return {str(f).lower() for f in fingerprint.get("flags", ())}


def _arch(fingerprint: Mapping[str, Any]) -> str:
    arch = str(fingerprint.get("arch", "")).lower()
    return "arm64" if arch in ("aarch64", "arm64") else arch


def fp16_arithmetic(fingerprint: Mapping[str, Any]) -> bool:
    """ARM64 with half-precision vector arithmetic: where ORT's CPU EP has fp16 Conv/GEMM kernels."""
    return _arch(fingerprint) == "arm64" and bool(_flags(fingerprint) & {"asimdhp", "fphp"})


def _int8_cpu(fingerprint: Mapping[str, Any]) -> str:
    if int8_has_vnni(fingerprint):
        dot = "dot product" if _arch(fingerprint) == "arm64" else "VNNI"
        return f"int8 x uint8 integer GEMM ({dot}), full 8-bit weights; first conv and classifier fp32"
    return (
        "int8 x uint8 integer GEMM (no VNNI: 7-bit weights against int16 saturation); "
        "first conv and classifier fp32"
    )


def format_support(fmt: str, provider: str, fingerprint: Mapping[str, Any]) -> Support:
    """The rule for `fmt` on a target running `provider` with this device `fingerprint`."""
    if fmt not in FORMATS:
        raise ValueError(f"quant={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r} is unknown; allowed: {', '.join(PROVIDERS)}")

    def ok(computes: str) -> Support:
        return Support(fmt, provider, True, computes)

    def refused(reason: str) -> Support:
        return Support(fmt, provider, False, "", reason)

    if fmt == "fp32":
        if provider == "cuda":
            return ok("fp32 (cuDNN/cuBLAS; TF32 tensor-core math on Ampere and newer by ORT's default)")
        return ok("fp32")
    if fmt == "fp16":
        if provider == "cuda":
            return ok("fp16 conv/GEMM (cuDNN/cuBLAS fp16, tensor cores where present), fp32 input/output")
        if fp16_arithmetic(fingerprint):
            return ok("fp16 conv/GEMM (MLAS fp16 NEON kernels), fp32 input/output")
        return refused(
            "ONNX Runtime's CPU EP has no fp16 Conv/Gemm kernels on this CPU (only ARM64 with asimdhp): "
            "it would cast to float32 and compute in fp32"
        )
    if fmt == "int8":
        if provider == "cuda":
            return refused(
                "ONNX Runtime's CUDA EP does not fuse QDQ into int8 kernels: it runs DequantizeLinear + "
                "float conv + QuantizeLinear (storage only, slower than fp32)"
            )
        return ok(_int8_cpu(fingerprint))
    return ok(INT4_COMPUTES)  # int4: MatMulNBits has CPU and CUDA kernels


def allowed_formats(provider: str, fingerprint: Mapping[str, Any]) -> list[str]:
    return [f for f in FORMATS if format_support(f, provider, fingerprint).ok]


def check_formats(formats: Iterable[str], provider: str, fingerprint: Mapping[str, Any]) -> list[Support]:
    """Support of every format, or ValueError (one line) at the first one the target does not compute in."""
    supports = []
    for fmt in formats:
        support = format_support(fmt, provider, fingerprint)
        if not support.ok:
            target = f"{provider} ({fingerprint.get('cpu_model') or _arch(fingerprint) or 'unknown cpu'})"
            raise ValueError(
                f"quant={fmt!r} is refused on {target}: {support.reason}; "
                f"allowed: {', '.join(allowed_formats(provider, fingerprint))}"
            )
        supports.append(support)
    return supports
