"""Checks on an uploaded ONNX file before any ONNX Runtime session sees it.

The agent runs on someone's device and takes files from the network: a file must not make the
runtime read other files (external data), run operators from a domain nobody vetted, or need an
input the agent cannot build. Every refusal is one line that names what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from onnx import GraphProto, ModelProto, TensorProto

# The one walk over a model's stored tensors (stdlib + onnx only: fine for the agent).
from hwnas.evaluators.onnx_check import attr_graphs, tensors_of

# Largest input the agent allocates (elements, batch included): 64 Mi floats = 256 MiB. A hostile
# file could otherwise declare a [1, 100000, 100000] input and have the agent allocate 40 GB.
MAX_INPUT_ELEMENTS = 1 << 26

# full_check (strict shape inference) costs about as much as parsing for the small CNNs a sweep
# measures; above this size the structural check alone is kept so a big upload cannot stall the agent.
FULL_CHECK_BYTES = 16 << 20


def allowed_opsets() -> dict[str, range]:
    """Domain -> versions a node may use. ai.onnx from opset 7 (the oldest ORT still runs) up to what this
    onnx knows; com.microsoft for ONNX Runtime's contrib ops (QDQ int4, MatMulNBits). A model may also
    import other domains that no node uses: ONNX Runtime's optimizer, which the int8 quantizer runs,
    declares nine (ai.onnx.ml, ai.onnx.training, org.pytorch.aten, ...) in every file it writes, and an
    import no node uses runs nothing."""
    latest = onnx.defs.onnx_opset_version()
    return {"": range(7, latest + 1), "ai.onnx": range(7, latest + 1), "com.microsoft": range(1, 2)}


class ModelRejected(ValueError):
    """The upload is not a model this agent measures; the message is the one-line reason."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None: the batch dimension left free


def _domain(domain: str) -> str:
    return "ai.onnx" if domain == "" else domain


def _nodes_of(graph: GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                yield from _nodes_of(sub)


def parse(data: bytes) -> ModelProto:
    if not data:
        raise ModelRejected("the request body is empty; expected the bytes of an ONNX file")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0].strip("\"' ")
        raise ModelRejected(f"not an ONNX file: protobuf cannot parse it ({why})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        # Many byte strings parse as a protobuf with only unknown fields; a model has a graph and an IR version.
        raise ModelRejected("not an ONNX file: no graph or no ir_version after parsing")
    return model


def check_no_external_data(model: ModelProto) -> None:
    for tensor, where in tensors_of(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            raise ModelRejected(
                f"external data is not accepted: tensor {tensor.name!r} ({where}) refers to a file; "
                "send a self-contained model (onnx.save_model without save_as_external_data)"
            )


def check_opsets(model: ModelProto) -> None:
    allowed = allowed_opsets()
    allowed_text = "nodes from ai.onnx 7.." + str(allowed[""].stop - 1) + " and com.microsoft 1"
    if len(model.functions):
        raise ModelRejected(f"model-local functions are not accepted (found {len(model.functions)}); allowed: {allowed_text}")
    if len(model.training_info):
        raise ModelRejected("training information (training_info) is not accepted; send an inference model")
    imported = {_domain(op.domain): op.version for op in model.opset_import}
    for node in _nodes_of(model.graph):
        domain = _domain(node.domain)
        if node.domain not in allowed:
            raise ModelRejected(
                f"node {node.name or node.op_type!r} uses op {node.op_type!r} from domain {domain!r}, "
                f"which is not allowed; allowed: {allowed_text}"
            )
        if domain not in imported:
            raise ModelRejected(f"node {node.name or node.op_type!r} uses domain {domain!r}, which the model does not import")
        if imported[domain] not in allowed[node.domain]:
            raise ModelRejected(f"opset {domain} version {imported[domain]} is not allowed; allowed: {allowed_text}")


def check_structure(model: ModelProto, size: int) -> None:
    try:
        onnx.checker.check_model(model, full_check=size <= FULL_CHECK_BYTES)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelRejected(f"onnx.checker refused the model: {first.strip()}") from None


def input_spec(model: ModelProto, batch_size: int) -> InputSpec:
    """The one float input: batch first (free or == batch_size), every other dimension fixed."""
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ModelRejected(f"the model has {len(inputs)} inputs ({names}); allowed: exactly one float input")
    inp = inputs[0]
    ttype = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or ttype.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(ttype.elem_type) if inp.type.HasField("tensor_type") else "not a tensor"
        raise ModelRejected(f"input {inp.name!r} is {kind}; allowed: a float32 tensor")
    if not ttype.HasField("shape") or len(ttype.shape.dim) == 0:
        raise ModelRejected(f"input {inp.name!r} has no shape; allowed: a fixed shape (batch first may be free)")
    shape: list[int | None] = []
    for axis, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif axis == 0:
            shape.append(None)
        else:
            what = repr(dim.dim_param) if dim.dim_param else "unknown"
            raise ModelRejected(
                f"input {inp.name!r} dimension {axis} is {what}; allowed: fixed sizes except the batch (dimension 0)"
            )
    if shape[0] is not None and shape[0] != batch_size:
        raise ModelRejected(f"input {inp.name!r} has a fixed batch of {shape[0]}; the protocol asks for batch_size={batch_size}")
    elements = batch_size
    for d in shape[1:]:
        elements *= int(d or 1)
    if elements > MAX_INPUT_ELEMENTS:
        raise ModelRejected(f"input {inp.name!r} has {elements} elements at batch {batch_size}; allowed: at most {MAX_INPUT_ELEMENTS}")
    return InputSpec(inp.name, tuple(shape))


def check_model(data: bytes, *, max_bytes: int, batch_size: int) -> tuple[ModelProto, InputSpec]:
    """Parse and vet `data`; ModelRejected (one line) on the first problem. Cheap checks first:
    external data and opsets before the checker, whose messages are less clear about those."""
    if len(data) > max_bytes:
        raise ModelRejected(f"the model is {len(data)} bytes; allowed: at most {max_bytes} (--max-bytes)")
    model = parse(data)
    check_no_external_data(model)
    check_opsets(model)
    check_structure(model, len(data))
    return model, input_spec(model, batch_size)
