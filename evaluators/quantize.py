"""Compress a float32 ONNX file to the numeric format a candidate asks for, with ONNX Runtime tools.

Each format is what the target computes (hwnas.evaluators.measure.formats has the rules and the
evidence): int8 is static QDQ that ORT's CPU EP fuses into integer kernels, with 8-bit or 7-bit
weights as the target's CPU needs; int4 is weight-only for the linear layers (MatMulNBits),
convolutions float32; fp16 is only produced for targets that compute in fp16.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from hwnas.evaluators.measure.fingerprint import device_fingerprint
from hwnas.evaluators.measure.formats import check_formats
from hwnas.spaces.candidate import FORMATS

_CALIBRATION_BATCH = 64
# int4 weights are quantized in blocks of this many along K (one scale per block and output column):
# MatMulNBits needs a power of two >= 16; 32 is ORT's default.
INT4_BLOCK = 32
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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
    fp32_path: Path, out_path: Path, calibration: np.ndarray, full_range: bool, keep_float: Sequence[str] = (),
    pin_first_last: bool = True,
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
        graph = onnx.load(str(pre), load_external_data=False).graph
        excluded = first_and_last_layers(graph) if pin_first_last else []
        excluded += [n for n in module_nodes(graph, keep_float) if n not in excluded]
        quantize_static(
            str(pre),
            str(out_path),
            _ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            # uint8 activations x int8 weights (U8S8) is ORT's fast x86 path: measured 1.16x vs
            # 0.67x the fp32 speed for S8S8 on an inverted-residual net at batch 1 (AVX2).
            activation_type=QuantType.QUInt8,
            # 7-bit weights unless the target has VNNI / ARM dot product: x86 CPUs with AVX2 only add
            # u8*s8 pairs in saturating int16 and lose whole points of accuracy (measured on digits:
            # 0.75 vs 0.88 fp32; with 7-bit weights 0.88 at the same speed). VNNI accumulates in
            # int32 directly, so full 8-bit weights are exact there (results/bench/formats.json).
            reduce_range=not full_range,
            nodes_to_exclude=excluded,
        )


def module_nodes(graph: onnx.GraphProto, modules: Sequence[str]) -> list[str]:
    """Names of the nodes that torch.onnx exported from the top-level submodules `modules` of the model.

    The TorchScript exporter names every node by its module scope: a node of the model's child "2"
    (a macro-CNN stage: nn.Sequential index) is "/2/2.0/.../Conv", so the node names under "/2/" are
    exactly that child's computation (tests/test_layer_precision.py checks it on exported stages).
    A name that matches no node is refused (ValueError, one line): keeping it float would otherwise
    silently do nothing (a renamed scope, another exporter).
    """
    names: list[str] = []
    for module in modules:
        if not module or "/" in module or "." in module:
            raise ValueError(f"keep_float: {module!r} is not a top-level module name; allowed: e.g. '2' (stage 2)")
        prefix = f"/{module}/"
        nodes = [n for n in graph.node if n.name.startswith(prefix)]
        if not nodes:
            scopes = sorted({n.name.split("/")[1] for n in graph.node if n.name.startswith("/") and "/" in n.name[1:]})
            raise ValueError(
                f"keep_float: module {module!r} has no node in the exported graph (none named {prefix}...); "
                f"allowed: {', '.join(scopes) or 'none found'}"
            )
        names += [n.name for n in nodes]
    return names


def first_and_last_layers(graph: onnx.GraphProto) -> list[str]:
    """Names of the first Conv and the last Gemm/MatMul: the layers that stay float32 in int8.

    The usual practice of post-training quantization (first and last layer at full precision): the
    stem sees raw pixels on one to three channels, where an int8 GEMM has almost no depth to
    amortise its packing and the input's quantisation, and the classifier's logits decide the
    answer. Measured on five macro-CNN nets (32x32 input, batch 1, one AVX2 core): int8 ran at
    0.27-1.14x the fp32 speed (median 0.62x) fully quantized, 0.29-1.24x (median 0.81x) like this.
    """
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    heads = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]


def _int4_blocks(w_kn: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B and scales for a [K, N] weight: symmetric int4 per block of `block` rows of K.

    B is uint8 [N, K/block, block/2], two weights a byte (first in the low nibble), stored as
    q + 8; with no zero_points input MatMulNBits subtracts 8 (ContribOperators.md, MatMulNBits).
    """
    k, n = w_kn.shape
    k_blocks = -(-k // block)
    padded = np.zeros((k_blocks * block, n), np.float32)  # K padded with zeros to whole blocks
    padded[:k] = w_kn
    blocks = padded.T.reshape(n, k_blocks, block)
    scales = np.abs(blocks).max(axis=2) / 7.0  # [-7, 7]: symmetric, so no zero-point tensor is needed
    scales[scales == 0] = 1.0
    q = (np.clip(np.rint(blocks / scales[..., None]), -7, 7) + 8).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(packed), scales.reshape(-1).astype(np.float32)


def _int4_weight_only(fp32_path: Path, out_path: Path) -> int:
    """Every linear layer (Gemm, MatMul with a constant 2-D weight) as MatMulNBits; the rest untouched.

    Returns how many layers were converted. A Gemm (torch.nn.Linear) becomes MatMulNBits + Add of its
    bias: MatMulNBits computes A x dequantized(B) in float32 inside the kernel.
    """
    model = onnx.load(str(fp32_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    converted = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        plain_gemm = node.op_type == "Gemm" and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
        if (
            weight is None
            or len(weight.dims) != 2
            or node.op_type not in ("Gemm", "MatMul")
            or (node.op_type == "Gemm" and not plain_gemm)
        ):
            nodes.append(node)
            continue
        w = onnx.numpy_helper.to_array(weight).astype(np.float32)
        w_kn = w.T if attrs.get("transB", 0) else w
        k, n = w_kn.shape
        packed, scales = _int4_blocks(w_kn, INT4_BLOCK)
        name = node.name or f"linear{converted}"
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(packed, f"{name}.int4_weight"),
                onnx.numpy_helper.from_array(scales, f"{name}.int4_scales"),
            ]
        )
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{name}.int4_weight", f"{name}.int4_scales"],
                [product],
                name=f"{name}.int4",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=INT4_BLOCK,
            )
        )
        if has_bias:
            bias = node.input[2]
            beta = float(attrs.get("beta", 1.0))
            if beta != 1.0:  # torch.nn.Linear exports beta=1; anything else folds into the bias
                scaled = onnx.numpy_helper.to_array(inits[bias]).astype(np.float32) * beta
                bias = f"{name}.bias_scaled"
                graph.initializer.append(onnx.numpy_helper.from_array(scaled, bias))
            nodes.append(onnx.helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}.bias"))
        converted += 1
    if converted:
        used = {i for n in nodes for i in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        onnx.save(model, str(out_path))
    return converted


def _check_loads(path: Path, fmt: str, provider: str) -> None:
    """The file must load and run on the target's provider where this ONNX Runtime has it, else on the CPU EP."""
    name = _ORT_PROVIDERS[provider]
    providers = [name] if name in ort.get_available_providers() else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
        first = session.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in first.shape]
        session.run(None, {first.name: np.zeros(shape, np.float32)})
    except Exception as exc:  # ORT raises its own exception types; report them as unsupported format.
        raise ValueError(
            f"quant={fmt!r} is not supported for this model: ONNX Runtime's {providers[0]} cannot run it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc


def compress_onnx(
    fp32_path: str | Path,
    fmt: str,
    calibration: np.ndarray,
    out_path: str | Path,
    *,
    int8_full_range: bool = False,
    provider: str = "cpu",
    fingerprint: dict | None = None,
    keep_float: Sequence[str] = (),
    pin_first_last: bool = True,
) -> Path:
    """Write `fp32_path` compressed to `fmt` at `out_path` for a target, and return that path.

    The target is `provider` ("cpu" | "cuda") on the device `fingerprint` (default: this machine);
    a format the target does not compute in is refused first (ValueError, one line;
    hwnas.evaluators.measure.formats.check_formats).

    fp32: a copy. fp16: weights and compute in float16, float32 input/output kept (CUDA, or ARM64
    with fp16 arithmetic). int8: static QDQ, per-channel int8 weights, uint8 activations calibrated
    on `calibration`; the first conv and the classifier stay float32 (`first_and_last_layers`);
    `int8_full_range=True` (targets with VNNI / ARM dot product,
    `hwnas.evaluators.measure.fingerprint.int8_has_vnni`) keeps 8-bit weights, False 7-bit.
    int4: weight-only, every linear layer as MatMulNBits (int4 blocks of INT4_BLOCK, float32
    arithmetic), convolutions float32; refused for a model without a linear layer.

    `keep_float` (int8 only): top-level module names of the exported torch model (a macro-CNN stage's
    index, `MacroCNNSpace.float_modules`) whose nodes stay float32 too: per-stage precision, the file
    holds exactly that mix (`module_nodes`). Refused for another format, where it would mean nothing.
    `pin_first_last=False` (compression.pin_first_last) quantizes the first conv and the classifier too.
    """
    if fmt not in FORMATS:
        raise ValueError(f"quant={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    if provider not in _ORT_PROVIDERS:
        raise ValueError(f"provider={provider!r} is unknown; allowed: {', '.join(_ORT_PROVIDERS)}")
    keep_float = list(keep_float)
    if keep_float and fmt != "int8":
        raise ValueError(f"keep_float: {keep_float} given with quant={fmt!r}; allowed: only with quant='int8'")
    check_formats([fmt], provider, fingerprint if fingerprint is not None else device_fingerprint(provider))
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
    elif fmt == "int8":
        _quantize_static(fp32_path, out_path, calibration, full_range=int8_full_range, keep_float=keep_float,
                         pin_first_last=pin_first_last)
    elif _int4_weight_only(fp32_path, out_path) == 0:
        raise ValueError(
            "quant='int4' has nothing to compute in int4 for this model: it has no linear layer "
            "(Gemm/MatMul with a constant weight); allowed: fp32, int8"
        )
    _check_loads(out_path, fmt, provider)
    return out_path
