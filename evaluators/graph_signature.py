"""What an ONNX file's latency depends on, without its weights: the graph's structure as one hash.

Two files with the same signature run the same kernels on tensors of the same shapes and types: ONNX
Runtime's time for them is the same up to noise. Latency-first (search/schedulers/) measures a candidate's
file with untrained weights before training; when the trained file has the signature of that early file, the
early figure is its latency. The values of initializers (weights, int8 scales and zero points) are left out;
their types and shapes are in, not their names (an exporter's numbering).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx


def _shape(value: onnx.ValueInfoProto) -> list[Any]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def _attribute(attr: onnx.AttributeProto) -> Any:
    if attr.type == onnx.AttributeProto.TENSOR:  # a constant's value is data, its type and shape are structure
        return ["tensor", attr.t.data_type, list(attr.t.dims)]
    if attr.type == onnx.AttributeProto.GRAPH:
        return ["graph", _graph(attr.g)]
    return [attr.type, str(onnx.helper.get_attribute_value(attr))]


def _graph(graph: onnx.GraphProto) -> list[Any]:
    # Tensor names are the exporter's numbering (they differ between two exports of one network), node order can
    # follow those names (a quantizer's), and an exporter may share one initializer between nodes whose values
    # happen to be equal. So each node is named by a hash of what it is and of where its inputs come from (a graph
    # input by position, a constant by type and shape, another node's output by that node's hash and slot), and
    # the graph is the sorted list of those hashes: the same for any naming and any valid order.
    consts = {t.name: f"const{t.data_type}{list(t.dims)}" for t in graph.initializer}
    source: dict[str, str] = {v.name: f"input{i}" for i, v in enumerate(graph.input) if v.name not in consts}
    pending = list(graph.node)
    hashes: list[str] = []
    while pending:
        ready = [n for n in pending if all(not i or i in consts or i in source for i in n.input)]
        if not ready:  # an input made outside this graph (a subgraph's outer scope): named as it is
            ready = pending[:1]
        for n in ready:
            inputs = [consts.get(i) or source.get(i) or f"outer:{i}" if i else "" for i in n.input]
            node = hashlib.sha256(repr([n.op_type, n.domain, inputs, len(n.output),
                                        [[a.name, _attribute(a)] for a in n.attribute]]).encode()).hexdigest()
            hashes.append(node)
            source.update({name: f"{node}:{j}" for j, name in enumerate(n.output) if name})
        pending = [n for n in pending if all(n is not r for r in ready)]
    return [
        [[v.type.tensor_type.elem_type, _shape(v)] for v in graph.input if v.name not in consts],
        [[source.get(v.name), v.type.tensor_type.elem_type, _shape(v)] for v in graph.output],
        sorted(hashes),
    ]


def graph_signature(path: str | Path) -> str:
    """sha256 of the file's structure: opsets, inputs, outputs, nodes in order with where each input comes from
    (a constant by type and shape) and their attributes (a constant tensor attribute by type and shape only)."""
    model = onnx.load(str(path), load_external_data=False)
    opsets = sorted([o.domain, o.version] for o in model.opset_import)
    text = repr([opsets, _graph(model.graph)])
    return hashlib.sha256(text.encode()).hexdigest()
