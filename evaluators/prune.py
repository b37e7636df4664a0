"""Structured channel pruning that physically shrinks the network (Torch-Pruning's dependency graph)."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn


def _last_layer(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """The Conv/Linear layer that runs last: the classifier, whose outputs are the classes and must stay."""
    executed: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: executed.append(mod))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    if not executed:
        raise ValueError(f"model {type(model).__name__} has no Conv/Linear layer; allowed: a CNN classifier")
    return executed[-1]


def prune(model: nn.Module, ratio: float, example_input: torch.Tensor) -> nn.Module:
    """Remove about `ratio` of the channels of every prunable layer group, by L2 magnitude.

    Torch-Pruning traces the graph so coupled layers (depthwise convs, residual adds, BatchNorm)
    lose the same channels. The input model is left untouched; ratio 0 returns it as is.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio={ratio!r} is out of range; allowed: 0 <= ratio < 1")
    if ratio == 0.0:
        return model
    pruned = copy.deepcopy(model).cpu().eval()
    example_input = example_input.cpu()
    classifier = _last_layer(pruned, example_input)
    pruner = tp.pruner.MetaPruner(
        pruned,
        example_input,
        # Group-level L2 norm: coupled channels are scored together, so residual branches agree.
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[classifier],
    )
    pruner.step()
    return pruned
