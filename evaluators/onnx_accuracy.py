"""Accuracy of an ONNX file, computed by ONNX Runtime: the number the product reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def onnx_accuracy(
    path: str | Path | bytes,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> float:
    """Fraction of `x` (float32 NCHW) whose arg-max logit equals `y`. `path`: a file this process
    wrote, or the bytes of a model from elsewhere checked by `evaluators.onnx_check.load_checked`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"x has {len(x)} rows and y has {len(y)}; allowed: equal, non-zero lengths")
    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=list(providers))
    input_name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    correct = 0
    for start in range(0, len(x), batch_size):
        (logits,) = session.run(None, {input_name: x[start : start + batch_size]})
        correct += int((np.asarray(logits).argmax(axis=1) == y[start : start + batch_size]).sum())
    return correct / len(y)
