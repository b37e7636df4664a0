"""The standard NAS-Bench-201 network (stem, 3 stages of N cells, 2 residual reductions) in PyTorch.

Apart from spaces/nb201.py so that sampling cells and reading arch strings never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hwnas.spaces.nb201 import EDGE_KEYS, N_NODES, OPS


class Zero(nn.Module):
    """The `none` op: multiplying by 0 keeps shape and dtype and exports to ONNX as a plain Mul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


class ReLUConvBN(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
        )


def make_op(op: str, channels: int) -> nn.Module:
    if op == "none":
        return Zero()
    if op == "skip_connect":
        return nn.Identity()
    if op == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if op == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if op == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"op {op!r} is not a NAS-Bench-201 op; allowed: {', '.join(OPS)}")


class Cell(nn.Module):
    """Node i = sum over j < i of op_ij(node j); the cell returns node 3."""

    def __init__(self, cell: Mapping[str, str], channels: int) -> None:
        super().__init__()
        self.edges = nn.ModuleList(make_op(cell[key], channels) for key in EDGE_KEYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        edges = iter(self.edges)
        for i in range(1, N_NODES):
            terms = [next(edges)(nodes[j]) for j in range(i)]
            node = terms[0]
            for term in terms[1:]:
                node = node + term
            nodes.append(node)
        return nodes[-1]


class ResNetReduction(nn.Module):
    """NAS-Bench-201's reduction: ResNet basic block, stride 2, shortcut = 2x2 avg-pool + 1x1 conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(in_ch, out_ch, 3, stride=2)
        self.conv_b = ReLUConvBN(out_ch, out_ch, 3)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, stride=2),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


def build_nb201_network(
    cell: Mapping[str, str], in_channels: int, C: int, N: int, num_classes: int
) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)]
    for stage, width in enumerate((C, 2 * C, 4 * C)):
        if stage > 0:
            layers.append(ResNetReduction(width // 2, width))
        layers += [Cell(cell, width) for _ in range(N)]
    layers += [
        nn.BatchNorm2d(4 * C),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * C, num_classes),
    ]
    return nn.Sequential(*layers)
