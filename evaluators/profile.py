"""Size and compute of a network, counted by Torch-Pruning's op counter."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def count_params_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(parameters, multiply-accumulates per forward pass of `example_input`)."""
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_input)
    finally:
        model.train(was_training)
    return int(params), int(macs)
