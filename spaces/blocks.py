"""Convolution blocks of the macro space: plain modules that trace, export to ONNX and prune cleanly."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """k x k convolution (same padding) + BatchNorm + ReLU; `groups=in_ch` makes it depthwise."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            # bias=False: the BatchNorm right after carries the shift.
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
        )


class DepthwiseSeparable(nn.Sequential):
    """Depthwise k x k conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU (MobileNetV1)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            ConvBNReLU(in_ch, in_ch, kernel, stride=stride, groups=in_ch),
            ConvBNReLU(in_ch, out_ch, 1),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when expansion is 1) -> depthwise k x k -> linear 1x1 project.

    The residual add is used only when the block keeps the shape (stride 1 and in_ch == out_ch).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, expansion: int = 1) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU(in_ch, hidden, 1))
        layers.append(ConvBNReLU(hidden, hidden, kernel, stride=stride, groups=hidden))
        # Linear bottleneck: no ReLU after the projection (MobileNetV2, sec. 3.2).
        layers.append(nn.Conv2d(hidden, out_ch, 1, bias=False))
        layers.append(nn.BatchNorm2d(out_ch))
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def make_block(block: str, in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Module:
    """Block from its folded name: `conv`, `dwsep` or `ir<expansion>`."""
    if block == "conv":
        return ConvBNReLU(in_ch, out_ch, kernel, stride=stride)
    if block == "dwsep":
        return DepthwiseSeparable(in_ch, out_ch, kernel, stride=stride)
    if block.startswith("ir") and block[2:].isdigit():
        return InvertedResidual(in_ch, out_ch, kernel, stride=stride, expansion=int(block[2:]))
    raise ValueError(f"block {block!r} is not a block; allowed: conv, dwsep, ir<expansion>")
