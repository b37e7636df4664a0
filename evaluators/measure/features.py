"""Latency features read from an ONNX file itself: any space, any compression format, the deployed graph.

MACs and parameters per layer kind, node counts (per-op overhead dominates 30 µs models), activation
memory (onnx shape inference) and quantized node counts. The candidate's host latency is not in the
file: `feature_row` adds it. Imports onnx + numpy only.

Node counts are of the graph AS EXPORTED, before any runtime optimisation. A runtime that fuses
(ONNX Runtime's default: Conv+Relu, Identity and constant elimination) runs fewer kernels; one that
does not (ORT_DISABLE_ALL, an interpreter, a small device runtime) runs one kernel per node, so the
per-op-type counts matter there: activations, binary elementwise ops, normalisations, shape/copy ops
and the "free" nodes (Identity/Constant: nothing after ORT's optimisation, a copy kernel each without it;
the exporter writes one per shared initializer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

# Bump when a feature's meaning changes: a predictor refuses features of another version.
FEATURES_VERSION = 2

KINDS = ("conv_dense", "conv_dw", "conv_1x1", "matmul", "pool", "elementwise")
FEATURE_NAMES = (
    "macs", "params", "nodes", "activation_bytes", "input_elems",
    *(f"macs_{k}" for k in KINDS),
    *(f"params_{k}" for k in KINDS),
    *(f"nodes_{k}" for k in KINDS),
    "nodes_quant", "nodes_qdq", "nodes_matmulnbits",
    # v2: per-op-type node counts of the graph before optimisation (see the module docstring).
    *(f"nodes_{g}" for g in ("free", "activation", "binary", "norm", "shape")),
)

CONV_OPS = {"Conv", "QLinearConv", "ConvInteger", "ConvTranspose"}
MATMUL_OPS = {"Gemm", "MatMul", "QLinearMatMul", "MatMulInteger", "MatMulNBits", "FusedMatMul", "QGemm"}
POOL_OPS = {"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "QLinearAveragePool",
            "QLinearGlobalAveragePool"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Nodes that cost nothing at run time once ORT has loaded the graph.
FREE_OPS = {"Constant", "Identity"}
# Op groups counted by node (feature nodes_<group>), whatever their kind above.
OP_GROUPS = {
    "activation": {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Tanh", "Gelu",
                   "Elu", "Selu", "Softplus", "Softmax", "Erf"},
    "binary": {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Pow", "Where"},
    "norm": {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"},
    "shape": {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Shape", "Gather", "Slice", "Concat",
              "Split", "Pad", "Expand", "Cast", "Resize"},
}
OP_GROUP = {op: g for g, ops in OP_GROUPS.items() for op in ops}
# Weight input index of each conv/matmul kind (others: input 1).
WEIGHT_INDEX = {"QLinearConv": 3, "QLinearMatMul": 3}

DTYPE_BYTES = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}


def _bad(source: str, problem: str) -> ValueError:
    return ValueError(f"onnx model {source}: {problem}; allowed: a self-contained ONNX file with fixed non-batch input dims")


def _load(model: str | Path | bytes | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "<in memory>"
    if isinstance(model, bytes):
        source, data = "<bytes>", model
    else:
        source = repr(str(model))
        try:
            data = Path(model).read_bytes()
        except OSError as exc:
            raise _bad(source, f"cannot be read ({exc.strerror})") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds for garbage
        raise _bad(source, f"is not an ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise _bad(source, "has no graph nodes")
    return proto, source


def _fix_batch(proto: onnx.ModelProto, batch: int) -> None:
    """Dynamic dims of the graph inputs -> `batch` (export gives a symbolic batch axis), so shapes infer to numbers."""
    initializers = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        for i, dim in enumerate(inp.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                if i != 0:
                    raise ValueError(f"input {inp.name!r} dim {i} is not fixed")
                dim.Clear()
                dim.dim_value = batch


def _shape_of(value: onnx.ValueInfoProto) -> tuple[tuple[int, ...] | None, int]:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None, t.elem_type
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None, t.elem_type
        dims.append(int(d.dim_value))
    return tuple(dims), t.elem_type


def _prod(shape: tuple[int, ...] | None) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def onnx_features(model: str | Path | bytes | onnx.ModelProto, *, batch: int = 1) -> dict[str, float]:
    """The features of FEATURE_NAMES for one ONNX model at `batch`; a one-line ValueError for a bad file."""
    proto, source = _load(model)
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # never modify the caller's model
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise _bad(source, f"initializer {t.name!r} refers to external data")
    try:
        _fix_batch(proto, batch)
        inferred = shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except ValueError as exc:
        raise _bad(source, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError, RuntimeError, ...
        raise _bad(source, f"shape inference failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    graph = inferred.graph
    shapes: dict[str, tuple[int, ...] | None] = {}
    dtypes: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shapes[value.name], dtypes[value.name] = _shape_of(value)
    init_sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer}
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for node in graph.node:  # Constant nodes carry weights too (some exporters)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    shapes[node.output[0]] = tuple(arr.shape)
                    init_sizes[node.output[0]] = int(arr.size)

    feats = dict.fromkeys(FEATURE_NAMES, 0.0)
    feats["params"] = float(sum(init_sizes.values()))
    inputs = [i for i in graph.input if i.name not in init_sizes]
    if not inputs:
        raise _bad(source, "has no graph input")
    feats["input_elems"] = float(sum(_prod(shapes.get(i.name)) for i in inputs))
    for node in graph.node:
        op = node.op_type
        if op in FREE_OPS:
            feats["nodes_free"] += 1
            continue
        if op in OP_GROUP:
            feats[f"nodes_{OP_GROUP[op]}"] += 1
        feats["nodes"] += 1
        out_shape = shapes.get(node.output[0]) if node.output else None
        out_elems = _prod(out_shape)
        kind, macs = _kind_and_macs(node, shapes, out_shape, out_elems)
        params = sum(init_sizes.get(name, 0) for name in node.input)
        if op.startswith("QLinear") or op.endswith("Integer") or op in {"QGemm"}:
            feats["nodes_quant"] += 1
        if op in QDQ_OPS:
            feats["nodes_qdq"] += 1
            # DequantizeLinear on a weight: its parameters belong to the layer it feeds; counted in "params".
            continue
        if op == "MatMulNBits":
            feats["nodes_matmulnbits"] += 1
        feats[f"macs_{kind}"] += macs
        feats[f"params_{kind}"] += params
        feats[f"nodes_{kind}"] += 1
    feats["macs"] = float(sum(feats[f"macs_{k}"] for k in KINDS))
    # Activation memory: every tensor a node writes (intermediates and outputs), at its inferred size.
    feats["activation_bytes"] = float(sum(
        _prod(shapes.get(out)) * DTYPE_BYTES.get(dtypes.get(out, 1), 4)  # type: ignore[call-overload]
        for node in graph.node if node.op_type not in FREE_OPS for out in node.output if out
    ))
    return {k: float(v) for k, v in feats.items()}


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _kind_and_macs(
    node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...] | None], out_shape: tuple[int, ...] | None, out_elems: int
) -> tuple[str, float]:
    op = node.op_type
    if op in CONV_OPS:
        idx = WEIGHT_INDEX.get(op, 1)
        w = shapes.get(node.input[idx]) if len(node.input) > idx else None
        group = int(_attr(node, "group", 1))
        if w is None or out_shape is None:
            return ("conv_dw" if group > 1 else "conv_dense"), 0.0
        # Each output element sums over (in_ch / group) x kernel window: w = [M, C/g, k...] (ConvTranspose: [C, M/g, k...])
        per_out = w[0] * _prod(w[2:]) // max(out_shape[1], 1) if op == "ConvTranspose" else w[1] * _prod(w[2:])
        kind = "conv_dw" if group > 1 else ("conv_1x1" if _prod(w[2:]) == 1 else "conv_dense")
        return kind, float(out_elems) * per_out
    if op in MATMUL_OPS:
        if op == "MatMulNBits":
            k = int(_attr(node, "K", 0))
            return "matmul", float(out_elems) * k
        a = shapes.get(node.input[0])
        if a is None or not a:
            return "matmul", 0.0
        k = a[0] if op == "Gemm" and int(_attr(node, "transA", 0)) else a[-1]
        return "matmul", float(out_elems) * k
    if op in POOL_OPS:
        if op.startswith("Global") or op == "QLinearGlobalAveragePool":
            return "pool", float(_prod(shapes.get(node.input[0])))
        return "pool", float(out_elems) * _prod(tuple(_attr(node, "kernel_shape", [1])))
    return "elementwise", float(out_elems)


def feature_row(features: Mapping[str, float], host_ms: float) -> dict[str, float]:
    """The predictor's raw input: the file's features plus the candidate's host latency (ms, local protocol)."""
    if not (isinstance(host_ms, (int, float)) and math.isfinite(host_ms) and host_ms > 0):
        raise ValueError(f"host_ms: {host_ms!r} is not a latency; allowed: a positive number of milliseconds")
    missing = [k for k in FEATURE_NAMES if k not in features]
    if missing:
        raise ValueError(f"features: {', '.join(missing[:3])} missing; allowed: onnx_features() output (version {FEATURES_VERSION})")
    return {**{k: float(features[k]) for k in FEATURE_NAMES}, "host_ms": float(host_ms)}
