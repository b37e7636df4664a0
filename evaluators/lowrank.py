"""Low-rank factorization of trained layers by truncated SVD (issue 13, item 4).

A k x k convolution Cin -> Cout (groups 1) becomes a k x k convolution Cin -> r (same stride, padding,
dilation; no bias) followed by a 1 x 1 convolution r -> Cout (carrying the bias), from the truncated SVD of
the weight reshaped to (Cout, Cin*k*k); a linear layer becomes two linears in -> r -> out the same way.
r = max(1, round(ratio * min(Cin*k*k, Cout))). Depthwise and grouped convolutions are left as they are.
The singular values are split evenly (sqrt) between the two factors, so both start at similar scales for
the fine-tuning that follows. At ratio 1.0 the product is the original weight up to float error.

The factorized layers are plain Conv2d/Linear modules in an nn.Sequential: they trace, export to ONNX
(two Conv/Gemm nodes under the original module path) and prune with Torch-Pruning (the r channels between
the two factors form their own prunable group).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


def check_ratio(ratio: float, where: str = "rank ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{where}: {ratio!r} is out of range; allowed: a number 0 < ratio <= 1")
    return float(ratio)


def rank_for(ratio: float, full_rank: int) -> int:
    """r = max(1, round(ratio * full_rank))."""
    return max(1, round(check_ratio(ratio) * full_rank))


class LowRankConv2d(nn.Sequential):
    """A factorized convolution: `reduce` (k x k, Cin -> r) then `expand` (1 x 1, r -> Cout)."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d) -> None:
        super().__init__(reduce, expand)


class LowRankLinear(nn.Sequential):
    """A factorized linear layer: in -> r (no bias), then r -> out (the bias)."""

    def __init__(self, reduce: nn.Linear, expand: nn.Linear) -> None:
        super().__init__(reduce, expand)


def _split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of the 2-D `weight` (out x in): A is r x in."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(weight.dtype), b.to(weight.dtype)


def conv_rank(conv: nn.Conv2d, ratio: float) -> int:
    k_h, k_w = conv.kernel_size
    return rank_for(ratio, min(conv.in_channels * k_h * k_w, conv.out_channels))


def saves(module: nn.Module, ratio: float) -> bool:
    """Whether factorizing at `ratio` leaves fewer weights (and multiply-adds) than the layer has."""
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        fan_in, out, rank = module.in_channels * k_h * k_w, module.out_channels, conv_rank(module, ratio)
    else:
        fan_in, out = module.in_features, module.out_features
        rank = rank_for(ratio, min(fan_in, out))
    return rank * (fan_in + out) < fan_in * out


def factorize_conv(conv: nn.Conv2d, ratio: float) -> LowRankConv2d:
    """The two-convolution form of `conv` (groups must be 1)."""
    if conv.groups != 1:
        raise ValueError(f"conv with groups={conv.groups}: not factorized; allowed: groups=1")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"conv padding {conv.padding!r}/{conv.padding_mode}: not factorized; allowed: numeric zero padding")
    rank = conv_rank(conv, ratio)
    weight = conv.weight
    a, b = _split(weight.reshape(conv.out_channels, -1), rank)
    reduce = nn.Conv2d(
        conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=False, device=weight.device, dtype=weight.dtype,
    )
    expand = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        reduce.weight.copy_(a.reshape(reduce.weight.shape))
        expand.weight.copy_(b.reshape(expand.weight.shape))
        if conv.bias is not None:
            expand.bias.copy_(conv.bias)
    return LowRankConv2d(reduce, expand)


def factorize_linear(linear: nn.Linear, ratio: float) -> LowRankLinear:
    rank = rank_for(ratio, min(linear.in_features, linear.out_features))
    weight = linear.weight
    a, b = _split(weight, rank)
    reduce = nn.Linear(linear.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    expand = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        reduce.weight.copy_(a)
        expand.weight.copy_(b)
        if linear.bias is not None:
            expand.bias.copy_(linear.bias)
    return LowRankLinear(reduce, expand)


def _targets(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, layer) of every factorizable layer under `root` (already factorized ones skipped)."""
    out: list[tuple[nn.Module, str, nn.Module]] = []
    for module in root.modules():
        if isinstance(module, (LowRankConv2d, LowRankLinear)):
            continue
        for child_name, child in module.named_children():
            if (isinstance(child, nn.Conv2d) and child.groups == 1) or isinstance(child, nn.Linear):
                out.append((module, child_name, child))
    return out


def factorize(model: nn.Module, ratios: Mapping[str, float], *, only_if_smaller: bool = True) -> tuple[nn.Module, int]:
    """A copy of `model` whose groups-1 Conv2d and Linear layers under each module path of `ratios` (e.g.
    {"1": 0.5, "3": 0.25}; "" is the whole model) are factorized at that ratio; ratio 1.0 leaves a part as it
    is. `only_if_smaller`: a layer whose factorized form would not have fewer weights (a square 1 x 1 at
    0.5: r (Cin + Cout) = Cin Cout) is left as it is, as it would only cost time. Returns (model, number of
    layers factorized); with none, the model itself. A ratio outside 0 < ratio <= 1: one-line ValueError."""
    todo = {path: check_ratio(ratio, f"rank ratio of {path!r}") for path, ratio in ratios.items()}
    if only_if_smaller:  # ratio 1.0 never shrinks a layer
        todo = {path: ratio for path, ratio in todo.items() if ratio < 1.0}
    if not todo:
        return model, 0
    out = copy.deepcopy(model)
    count = 0
    for path, ratio in todo.items():
        root = out.get_submodule(path)  # AttributeError names a path the model does not have
        for parent, child_name, layer in _targets(root):
            if only_if_smaller and not saves(layer, ratio):
                continue
            factor = factorize_conv(layer, ratio) if isinstance(layer, nn.Conv2d) else factorize_linear(layer, ratio)
            setattr(parent, child_name, factor)
            count += 1
    if count == 0:
        return model, 0
    return out, count
