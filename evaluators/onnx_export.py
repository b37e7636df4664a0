"""PyTorch -> ONNX (float32), with a dynamic batch axis."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, opset: int) -> Path:
    """Write `model` (eval mode, CPU) as a float32 ONNX file; the caller's model is not moved or mutated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # TorchScript exporter, not dynamo: measured 0.15 s vs 3.3 s per small CNN here, and these
        # plain conv nets need nothing the dynamo path adds; export runs once per trial.
        torch.onnx.export(
            model,
            (example_input.cpu(),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return path
