"""Compress a float32 ONNX file to the storage/compute format a candidate asks for, with ONNX Runtime tools."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from hwnas.spaces.candidate import FORMATS

_CALIBRATION_BATCH = 64


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration images to ORT's calibrator in fixed-size batches."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._batches = iter(
            [
                {input_name: np.ascontiguousarray(images[i : i + _CALIBRATION_BATCH], dtype=np.float32)}
                for i in range(0, len(images), _CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize_static(
    fp32_path: Path, out_path: Path, calibration: np.ndarray, weight_type: QuantType
) -> None:
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(
            f"calibration has shape {calibration.shape}; allowed: a non-empty float32 NCHW array"
        )
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference + graph clean-up first: ORT's quantizer needs value shapes to pick per-channel axes.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        keep_float = first_and_last_layers(onnx.load(str(pre), load_external_data=False).graph)
        # The quantizer warns once per file that int4 QDQ lives in com.microsoft before opset 21: expected.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(pre),
                str(out_path),
                _ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=weight_type,
                # uint8 activations x int8 weights (U8S8) is ORT's fast x86 path: measured 1.16x vs
                # 0.67x the fp32 speed for S8S8 on an inverted-residual net at batch 1.
                activation_type=QuantType.QUInt8,
                # 7-bit weights: x86 CPUs without VNNI (AVX2 only, like this project's machines) add
                # u8*s8 pairs in saturating int16 and lose whole points of accuracy (measured on
                # digits: 0.75 vs 0.88 fp32; with 7-bit weights 0.88 at the same speed). The file
                # then gives the same answers on every x86 CPU, VNNI or not.
                reduce_range=True,
                nodes_to_exclude=keep_float,
            )
        finally:
            root.setLevel(level)


def first_and_last_layers(graph: onnx.GraphProto) -> list[str]:
    """Names of the first Conv and the last Gemm/MatMul: the layers that stay float32 in int8/int4.

    The usual practice of post-training quantization (first and last layer at full precision): the
    stem sees raw pixels on one to three channels, where an int8 GEMM has almost no depth to
    amortise its packing and the input's quantisation, and the classifier's logits decide the
    answer. Measured on five macro-CNN nets (32x32 input, batch 1, one AVX2 core): int8 ran at
    0.27-1.14x the fp32 speed (median 0.62x) fully quantized, 0.29-1.24x (median 0.81x) like this.
    """
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    heads = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]


def _check_runs_on_cpu(path: Path, fmt: str) -> None:
    """A format is only offered if ORT's CPU EP can load and run the file it produced."""
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types; report them as unsupported format.
        raise ValueError(
            f"quant={fmt!r} is not supported for this model: ONNX Runtime's CPU EP cannot load it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc


def compress_onnx(fp32_path: str | Path, fmt: str, calibration: np.ndarray, out_path: str | Path) -> Path:
    """Write `fp32_path` compressed to `fmt` at `out_path` and return that path.

    fp32: a copy. fp16: weights and compute in float16, float32 input/output kept. int8: static QDQ,
    per-channel int8 weights, int8 activations calibrated on `calibration`; the first conv and the
    classifier stay float32 (`first_and_last_layers`). int4: as int8 but with int4 weights (ORT
    writes its com.microsoft QDQ ops below opset 21); checked to run on the CPU EP.
    """
    if fmt not in FORMATS:
        raise ValueError(f"quant={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "fp32":
        if fp32_path.resolve() != out_path.resolve():
            shutil.copyfile(fp32_path, out_path)
    elif fmt == "fp16":
        half = OnnxModel(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True))
        # The converter appends its input/output Casts after the nodes that use them; ONNX requires
        # topological order (onnx.checker refuses the file, evaluators/onnx_check.py with it).
        half.topological_sort()
        onnx.save(half.model, str(out_path))
    else:
        weight_type = QuantType.QInt8 if fmt == "int8" else QuantType.QInt4
        _quantize_static(fp32_path, out_path, calibration, weight_type)
    _check_runs_on_cpu(out_path, fmt)
    return out_path
