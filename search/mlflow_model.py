"""The exported model as an MLflow model directory (ONNX flavour), loadable with `mlflow.pyfunc`,
`mlflow.onnx` and `mlflow models predict/serve`.

The folder holds the measured ONNX file with nothing changed but its `metadata_props` (the caller's
preprocessing, labels ...), a signature read from the file itself (input name, dtype, NCHW shape with
a free batch axis; output (-1, K)), an input example and explicit pip requirements (the installed
onnx / onnxruntime / numpy, so MLflow runs no requirement-inference subprocess). After writing, the
file is read back and compared with the source: everything but `metadata_props` must serialize to
the same bytes, so the deployed model is the measured one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.evaluators.onnx_check import OnnxFileError, load_checked

MODEL_FILE = "model.onnx"  # the name mlflow.onnx.save_model gives the file


class ModelFileError(ValueError):
    """An export that does not hold the source model: one line naming the file and why."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse(path: Path) -> tuple[Any, bytes]:
    import onnx

    try:
        data = load_checked(path)
    except OnnxFileError as exc:
        raise ModelFileError(str(exc)) from None
    return onnx.load_model_from_string(data), data


def _distribution_version(*names: str) -> tuple[str, str] | None:
    for name in names:
        try:
            return name, importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return None


def default_pip_requirements() -> list[str]:
    """What serving the ONNX flavour needs, pinned to this environment's versions."""
    found = [
        _distribution_version("onnx"),
        _distribution_version("onnxruntime", "onnxruntime-gpu"),  # whichever is installed
        _distribution_version("numpy"),
    ]
    return [f"{name}=={version}" for name, version in (f for f in found if f is not None)]


def _tensor_spec(value_info: Any, where: str) -> Any:
    from mlflow.types import TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    ttype = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not ttype.HasField("shape"):
        raise ModelFileError(f"{where} {value_info.name!r}: no tensor shape; allowed: a tensor with a static rank")
    # Named or unknown axes are free (-1); the first one is the batch axis and always free.
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in ttype.shape.dim]
    if dims:
        dims[0] = -1
    return TensorSpec(np.dtype(tensor_dtype_to_np_dtype(ttype.elem_type)), tuple(dims), value_info.name)


def signature_of(model: Any) -> Any:
    """The MLflow signature of an ONNX model: its graph inputs (not initializers) and outputs."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema

    initializers = {t.name for t in model.graph.initializer}
    inputs = [_tensor_spec(v, "input") for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor_spec(v, "output") for v in model.graph.output]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _without_metadata(model: Any) -> bytes:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    return copy.SerializeToString(deterministic=True)


def _check_example(example: np.ndarray, signature: Any) -> np.ndarray:
    spec = signature.inputs.inputs[0]
    if not isinstance(example, np.ndarray) or example.dtype != spec.type:
        got = getattr(example, "dtype", type(example).__name__)
        raise ModelFileError(f"example: {got} is not an array of the model's input type; allowed: {spec.type} {spec.shape}")
    fits = example.ndim == len(spec.shape) and all(s in (-1, n) for s, n in zip(spec.shape, example.shape, strict=True))
    if not fits or example.shape[0] < 1:
        raise ModelFileError(f"example: shape {example.shape} does not fit input {spec.name!r}; allowed: {spec.shape}, batch >= 1")
    return example


def save_mlflow_model(
    source: Path,
    out_dir: Path,
    *,
    metadata: Mapping[str, str],
    example: np.ndarray,
    pip_requirements: list[str] | None = None,
    execution_providers: list[str] | None = None,
) -> dict[str, str]:
    """Write `out_dir` (must not exist) as an MLflow ONNX model of `source` with `metadata` in both the
    ONNX metadata_props and the MLmodel; ModelFileError when the written graph is not the source's.
    `execution_providers`: what the pyfunc flavour opens the model with (MLflow's default tries CUDA
    first and warns on every CPU load); the sweep's target provider, with the CPU as the fallback."""
    import mlflow.onnx
    import onnx

    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists():
        raise ModelFileError(f"out_dir: {out_dir} exists; allowed: a folder that does not exist yet (remove the old export first)")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ModelFileError(f"metadata: {bad[0]!r} is not a string key with a string value; allowed: str -> str (JSON text)")
    model, source_bytes = _parse(source)
    signature = signature_of(model)
    if len(signature.inputs.inputs) != 1:
        names = [s.name for s in signature.inputs.inputs]
        raise ModelFileError(f"{source}: inputs {names}; allowed: a model with one input tensor")
    example = _check_example(example, signature)

    # Keep the file's own metadata_props unless the caller sets the same key.
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata)
    onnx.helper.set_model_props(model, props)

    mlflow.onnx.save_model(
        model,
        str(out_dir),
        signature=signature,
        input_example=example,
        pip_requirements=list(pip_requirements) if pip_requirements is not None else default_pip_requirements(),
        metadata=dict(metadata),
        save_as_external_data=False,
        **({"onnx_execution_providers": list(execution_providers)} if execution_providers else {}),
    )

    written_path = out_dir / MODEL_FILE
    written, written_bytes = _parse(written_path)
    _check_same(onnx.load_model_from_string(source_bytes), written, source, written_path)
    if {p.key: p.value for p in written.metadata_props} != props:
        raise ModelFileError(f"{written_path}: metadata_props differ from what was written; allowed: the given metadata")
    return {
        "model_file": MODEL_FILE,
        "sha256": _sha256(written_bytes),
        "source_sha256": _sha256(source_bytes),
        "graph_sha256": _sha256(written.graph.SerializeToString(deterministic=True)),
    }


def verify_same_model(source: Path, written: Path) -> None:
    """ModelFileError unless `written` is `source` up to metadata_props (graph, opsets, ir_version ...)."""
    _check_same(_parse(Path(source))[0], _parse(Path(written))[0], source, written)


def _check_same(source_model: Any, written_model: Any, source: Path, written: Path) -> None:
    # The source (before its metadata was set) and the written file, compared with metadata_props cleared.
    if _without_metadata(source_model) != _without_metadata(written_model):
        raise ModelFileError(f"{written}: graph, opsets or ir_version differ from {source}; allowed: the source model unchanged")


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (loaded checked, from bytes)."""
    model, _ = _parse(Path(path))
    return {p.key: p.value for p in model.metadata_props}
