"""Quantization-aware training (QAT) for int8 candidates, compatible with ONNX Runtime's static QDQ.

The int8 file is always made by `hwnas.evaluators.quantize.compress_onnx` (ORT `quantize_static`,
QDQ, per-channel symmetric int8 weights, uint8 asymmetric MinMax activations, first conv and last
linear float, `keep_float` stages float). QAT only changes the weights that file starts from:

1. `prepare_qat` folds every BatchNorm into its conv (ORT quantizes the folded weight the exporter
   writes) and makes every layer ORT will quantize simulate ORT's integer grids in its forward pass:
   weights per output channel exactly as ORT rounds them, input activations per tensor in uint8.
2. The caller fine-tunes that network (any torch loop, `hwnas.evaluators.train.fit`).
3. `strip_qat` hands back a plain float network (Conv2d with bias, Identity where BN was) holding the
   QAT weights; exported with `export_onnx` it has the original's ONNX structure (op types, node
   scopes "/<k>/...") and latency, and `compress_onnx` quantizes it unchanged.

ORT's rules reproduced here (onnxruntime/quantization/quant_utils.py, ORT 1.32):
- weights, int8 symmetric per channel (axis 0 of Conv [out, in/g, kh, kw] and Gemm transB [out, in]):
  qmin, qmax = get_qmin_qmax_for_qType(INT8, reduce_range, symmetric=True): (-64, 64) with
  reduce_range (7-bit), else (-127, 127); compute_scale_zp: absmax = max|w| over the channel (the range
  always includes 0), scale = float32((2 * absmax in float64) / (qmax - qmin)), zero point 0, scale 1
  where that is below float32's tiny; quantize_nparray: q = clip(round_half_even(w / scale), -128, 127)
  in float32; DequantizeLinear: q * scale.
- activations, uint8 asymmetric per tensor, never reduced: qmin, qmax = 0, 255; rmin = min(min, 0),
  rmax = max(max, 0); scale = float32((rmax - rmin) / 255); zero point = round(0 - rmin / scale).
  ORT takes min/max over the calibration set; here they are a moving average of the training batches'.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import pairwise
from typing import cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# uint8 activations: ORT's ONNX_INT_TYPE_RANGE[UINT8] (activations are never reduce_range'd in QDQ).
_ACT_QMIN, _ACT_QMAX = 0, 255
# Moving-average momentum of the activation range: the ranges follow the weights as they move.
_ACT_MOMENTUM = 0.1
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def weight_qrange(full_range: bool) -> tuple[int, int]:
    """ORT's (qmin, qmax) for symmetric int8 weights: reduce_range=True -> (-64, 64), else (-127, 127)."""
    return (-127, 127) if full_range else (-64, 64)


def fake_quant_weight(weight: torch.Tensor, *, full_range: bool) -> torch.Tensor:
    """`weight` rounded to ORT's per-output-channel symmetric int8 grid, with a straight-through gradient.

    Written out instead of torch.fake_quantize_per_channel_affine: that kernel multiplies by 1/scale,
    ORT divides by scale, and the two can round a value to different integers; this division is
    bit-for-bit ORT's `(w / scale).round()`. The scale is recomputed from the current weight each
    step (as ORT will from the final weight), so nothing is ever clipped and the plain
    straight-through gradient (identity) is the right one.
    """
    qmin, qmax = weight_qrange(full_range)
    absmax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1).double()
    scale64 = (absmax + absmax) / float(qmax - qmin)  # ORT: float64 (rmax - rmin) / (qmax - qmin)
    scale = torch.where(scale64 < _FLOAT32_TINY, torch.ones_like(scale64), scale64).float()
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    # ORT clips to the whole int8 type range; |w / scale| <= qmax already, so this never bites.
    q = torch.clamp(torch.round(weight.detach() / scale), -128, 127)
    return weight + (q * scale - weight).detach()


class _QATLayer:
    """Mixin of the fake-quantized Conv2d/Linear: input activation range observer and both fake quants.

    Subclasses of the torch layers (not wrappers) so a layer keeps its module path: strip_qat swaps it
    back in place and the exporter's "/<k>/..." node scopes stay what compress_onnx's keep_float reads.
    """

    full_range: bool
    act_min: torch.Tensor
    act_max: torch.Tensor
    observed: torch.Tensor
    training: bool

    def _init_qat(self, full_range: bool) -> None:
        self.full_range = full_range
        assert isinstance(self, (nn.Conv2d, nn.Linear))
        device = self.weight.device  # the layer may already sit on a GPU
        self.register_buffer("act_min", torch.zeros((), device=device))
        self.register_buffer("act_max", torch.zeros((), device=device))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool, device=device))

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # eval mode: ranges frozen
            with torch.no_grad():
                # Include 0 like ORT's compute_scale_zp, so that 0 (padding, ReLU zeros) is exact.
                lo = torch.clamp(x.min(), max=0.0).float()
                hi = torch.clamp(x.max(), min=0.0).float()
                # torch.where, not `if observed`: no device-to-host sync per layer and step on a GPU.
                self.act_min.copy_(
                    torch.where(self.observed, torch.lerp(self.act_min, lo, _ACT_MOMENTUM), lo)
                )
                self.act_max.copy_(
                    torch.where(self.observed, torch.lerp(self.act_max, hi, _ACT_MOMENTUM), hi)
                )
                self.observed.fill_(True)
        elif not bool(self.observed):
            return x  # no range seen yet (never trained): nothing to quantize against
        rmin, rmax = self.act_min.double(), self.act_max.double()
        scale64 = (rmax - rmin) / float(_ACT_QMAX - _ACT_QMIN)
        # ORT: scale 1 and zero point 0 where the range is empty (below float32's tiny).
        empty = scale64 < _FLOAT32_TINY
        zero_point = torch.where(empty, 0.0, torch.round(_ACT_QMIN - rmin / scale64)).to(torch.int32)
        scale = torch.where(empty, 1.0, scale64).float()
        # The core op (clip-aware straight-through gradient: none outside the range) with ORT's own
        # scale and zero point; torch.ao.quantization's FakeQuantize imports cleanly in torch 2.13 but
        # its observers compute scale and zero point by their own rules (float32, eps floor), not ORT's.
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, _ACT_QMIN, _ACT_QMAX)

    def _fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(weight, full_range=self.full_range)


class QATConv2d(_QATLayer, nn.Conv2d):
    """nn.Conv2d computing on ORT's int8 grids (uint8 input, per-channel int8 weight)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self._fake_quant_input(input), self._fake_quant_weight(self.weight), self.bias
        )


class QATLinear(_QATLayer, nn.Linear):
    """nn.Linear computing on ORT's int8 grids (uint8 input, per-channel int8 weight)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            self._fake_quant_input(input), self._fake_quant_weight(self.weight), self.bias
        )


def _fold_batchnorms(module: nn.Module) -> None:
    """In place: every Conv2d directly followed by a BatchNorm2d in an nn.Sequential gets the BN folded
    in (running statistics) and the BN becomes nn.Identity; the exporter folds exactly these pairs."""
    for child in module.children():
        _fold_batchnorms(child)
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    for first, second in pairwise(names):
        conv, bn = module._modules[first], module._modules[second]
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            training = conv.training
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
            module._modules[first] = fused.train(training)
            module._modules[second] = nn.Identity()


def _same_layer(cls: type[nn.Module], layer: nn.Conv2d | nn.Linear) -> nn.Module:
    """A `cls` (Conv2d/Linear or a QAT subclass) configured like `layer`, holding its weight and bias."""
    new: nn.Module
    if isinstance(layer, nn.Conv2d):
        new = cls(
            layer.in_channels,
            layer.out_channels,
            cast(tuple[int, int], layer.kernel_size),
            stride=cast(tuple[int, int], layer.stride),
            padding=cast("str | tuple[int, int]", layer.padding),
            dilation=cast(tuple[int, int], layer.dilation),
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    else:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
    params = {k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}
    new.load_state_dict(params, strict=False)  # strict=False: a QAT layer's observer buffers start empty
    return new.to(layer.weight.device, layer.weight.dtype).train(layer.training)


def _to_qat(layer: nn.Conv2d | nn.Linear, full_range: bool) -> nn.Module:
    new = _same_layer(QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear, layer)
    assert isinstance(new, _QATLayer)
    new._init_qat(full_range)
    return new


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = new


def prepare_qat(
    model: nn.Module, *, keep_float: Sequence[str] = (), full_range: bool, pin_first_last: bool = True
) -> nn.Module:
    """A copy of `model` with BatchNorms folded and ORT's int8 grids simulated where ORT will quantize.

    Quantized like `compress_onnx(..., "int8", int8_full_range=full_range, keep_float=keep_float)`
    does: every Conv2d and Linear except the first Conv2d and the last Linear in module order (the
    exported graph's first Conv and last Gemm; both quantized too with `pin_first_last=False`) and those
    under the top-level children `keep_float`. Train it, then `strip_qat` it.
    """
    children = [name for name, _ in model.named_children()]
    for name in keep_float:
        if name not in children:
            raise ValueError(
                f"keep_float: {name!r} is not a top-level module of the model; allowed: {', '.join(children) or 'none'}"
            )
    qat = copy.deepcopy(model)
    _fold_batchnorms(qat)
    # Module order is the exported graph's node order for these nets: the first Conv2d is ORT's first
    # Conv node, the last Linear its last Gemm (every Conv2d/Linear counts, as every node does for ORT).
    layers = [(path, m) for path, m in qat.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [path for path, m in layers if isinstance(m, nn.Conv2d)]
    linears = [path for path, m in layers if isinstance(m, nn.Linear)]
    excluded = set(convs[:1] + linears[-1:]) if pin_first_last else set()
    for path, layer in layers:
        # type() is exact: a QAT layer (prepared twice) or another subclass with its own forward is left as is.
        if path in excluded or path.split(".")[0] in keep_float or type(layer) not in (nn.Conv2d, nn.Linear):
            continue
        _replace(qat, path, _to_qat(layer, full_range))
    return qat


def qat_layers(model: nn.Module) -> list[str]:
    """Module paths of the fake-quantized layers of a `prepare_qat` model (the layers ORT quantizes)."""
    return [path for path, m in model.named_modules() if isinstance(m, _QATLayer)]


def strip_qat(model: nn.Module) -> nn.Module:
    """A copy of a `prepare_qat` model as plain float modules in eval mode, holding the trained weights.

    Fake-quantized layers become nn.Conv2d / nn.Linear again (the float weights, not rounded: ORT
    rounds them the same way when it quantizes the exported file); folded convs keep their bias and
    nn.Identity stays where the BatchNorm was, which exports to the same ONNX graph as the BN model.
    """
    plain = copy.deepcopy(model)
    for path, layer in list(plain.named_modules()):
        if isinstance(layer, QATConv2d):
            _replace(plain, path, _same_layer(nn.Conv2d, layer))
        elif isinstance(layer, QATLinear):
            _replace(plain, path, _same_layer(nn.Linear, layer))
    return plain.eval()
