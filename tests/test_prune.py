from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hwnas.evaluators.profile import count_params_macs
from hwnas.evaluators.prune import prune


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


def plain_cnn() -> nn.Module:
    return nn.Sequential(
        *conv_bn(3, 32),
        *conv_bn(32, 64),
        nn.MaxPool2d(2),
        *conv_bn(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def separable_cnn() -> nn.Module:
    return nn.Sequential(
        *conv_bn(3, 32),
        *conv_bn(32, 32, groups=32),
        *conv_bn(32, 64, k=1),  # depthwise + pointwise
        *conv_bn(64, 64, groups=64),
        *conv_bn(64, 64, k=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            *conv_bn(channels, hidden, k=1),
            *conv_bn(hidden, hidden, groups=hidden),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 32))
        self.blocks = nn.Sequential(InvertedResidual(32, 4), InvertedResidual(32, 4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


MODELS = {"plain": plain_cnn, "separable": separable_cnn, "inverted_residual": MobileNetLike}
EXAMPLE = torch.randn(1, 3, 16, 16)


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_prune_removes_about_ratio_of_channels_and_still_runs(name, ratio):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    before = copy.deepcopy(model.state_dict())
    params0, macs0 = count_params_macs(model, EXAMPLE)
    pruned = prune(model, ratio, EXAMPLE).eval()

    kept = conv_channels(pruned) / conv_channels(model)
    assert kept == pytest.approx(1 - ratio, abs=0.08)
    params1, macs1 = count_params_macs(pruned, EXAMPLE)
    assert params1 < params0 * (1 - ratio / 2) and macs1 < macs0 * (1 - ratio / 2)

    batch = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = pruned(batch)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # Depthwise convs stay depthwise: one group per channel, in == out.
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    # The input model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_classifier_keeps_its_outputs():
    pruned = prune(plain_cnn(), 0.5, EXAMPLE)
    assert pruned[-1].out_features == 10 and pruned[-1].in_features == 32


def test_ratio_zero_returns_the_model_unchanged():
    model = plain_cnn()
    assert prune(model, 0.0, EXAMPLE) is model


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        prune(plain_cnn(), ratio, EXAMPLE)


def test_count_params_matches_torch():
    model = plain_cnn()
    params, macs = count_params_macs(model, EXAMPLE)
    assert params == sum(p.numel() for p in model.parameters())
    assert macs > params  # convs reuse weights across positions
