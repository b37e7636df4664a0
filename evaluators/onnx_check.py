"""Load an ONNX file that this process did not write (a run folder's model, a file given to
`evaluate_file`) before ONNX Runtime sees it.

ONNX Runtime opens whatever a model names: a tensor's external data is a path (`../../secret`) it
reads from disk. So a file from elsewhere is read as bytes (at most `max_bytes`), parsed without
external data, refused if any tensor points outside the file, checked with `onnx.checker`, and only
then handed to `ort.InferenceSession` as bytes, never as a path. Every refusal names the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 30  # 1 GiB: far above any model hwnas searches, below protobuf's 2 GiB limit


class OnnxFileError(ValueError):
    """An ONNX file that is not loaded: one line naming the file and why."""


def tensors_of(graph: Any, where: str = "graph") -> Iterator[tuple[Any, str]]:
    """Every TensorProto stored in `graph` and its subgraphs, with a readable place for messages
    (the agent's upload check names it)."""
    for t in graph.initializer:
        yield t, f"initializer {t.name!r}"
    for s in graph.sparse_initializer:
        yield s.values, f"sparse initializer {s.values.name!r}"
        yield s.indices, f"sparse initializer {s.values.name!r} (indices)"
    for node in graph.node:
        label = f"node {node.name or node.op_type!r} attribute"
        for attr in node.attribute:
            for t in _attr_tensors(attr):
                yield t, f"{label} {attr.name!r}"
            for sub in attr_graphs(attr):
                yield from tensors_of(sub, f"{where}/{attr.name}")


def _attr_tensors(attr: Any) -> Iterator[Any]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    for sparse in attr.sparse_tensors:
        yield sparse.values
        yield sparse.indices


def attr_graphs(attr: Any) -> Iterator[Any]:
    if attr.HasField("g"):
        yield attr.g
    yield from attr.graphs


def all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, constants, subgraphs, functions."""
    for tensor, _ in tensors_of(model.graph):
        yield tensor
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                yield from _attr_tensors(attr)
                for sub in attr_graphs(attr):
                    for tensor, _ in tensors_of(sub):
                        yield tensor


def load_checked(path: str | Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a checked, self-contained ONNX model; OnnxFileError (one line) otherwise."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path}: not a file; allowed: an ONNX model file")
    size = path.stat().st_size
    if size > max_bytes:
        raise OnnxFileError(f"{path}: {size} bytes; allowed: an ONNX model of at most {max_bytes} bytes")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)  # bytes: no external data is looked up
    except Exception as exc:
        raise OnnxFileError(f"{path}: not an ONNX model ({type(exc).__name__}); allowed: a model hwnas exported") from None
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise OnnxFileError(
                f"{path}: tensor {tensor.name!r} refers to external data ({where!r}); allowed: a self-contained model"
            )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxFileError(f"{path}: fails the ONNX checker ({text}); allowed: a valid model") from None
    return data
