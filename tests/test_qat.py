"""Quantization-aware training for int8 candidates (evaluators/qat.py), checked against ONNX Runtime itself.

The fake quantization must be ORT's own grid: the prepared layers' fake-quantized weights equal the
weights ORT's quantize_static writes (int8 x per-channel scale) for the same layers, 7-bit and 8-bit;
the layers faked are exactly those ORT quantizes; stripping gives back the original's function and
ONNX structure; and on digits a short QAT fine-tune gives an ORT int8 file at least as accurate as
post-training quantization of the same float model, within a few points of float.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits
from torch import nn

from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.qat import fake_quant_weight, prepare_qat, qat_layers, strip_qat
from hwnas.evaluators.quantize import compress_onnx
from hwnas.spaces.blocks import ConvBNReLU, DepthwiseSeparable, InvertedResidual

SHAPE = (1, 8, 8)


def small_net(seed: int = 0, width: int = 16) -> nn.Sequential:
    """Macro-CNN-like: stem (float in int8), two stages of the three block kinds, two linear layers
    (the first quantized, the classifier float); BN statistics randomized so folding matters."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        ConvBNReLU(1, width, 3),
        nn.Sequential(ConvBNReLU(width, width, 3, stride=2), InvertedResidual(width, width, 3, expansion=2)),
        nn.Sequential(DepthwiseSeparable(width, 2 * width, 3, stride=2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net.eval()


def int8_file(model: nn.Module, tmp: Path, name: str, calibration: np.ndarray, **kwargs: object) -> Path:
    fp32 = export_onnx(model, torch.from_numpy(calibration[:1]), tmp / f"{name}.fp32.onnx", opset=17)
    return compress_onnx(fp32, "int8", calibration, tmp / f"{name}.int8.onnx", **kwargs)  # type: ignore[arg-type]


def ort_weights(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(node name, int8 weight, per-channel scale) of every Conv/Gemm whose weight comes from a
    DequantizeLinear in the QDQ file, in graph order: the layers ORT computes in int8."""
    graph = onnx.load(str(path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    found = []
    for n in graph.node:
        src = producer.get(n.input[1]) if n.op_type in ("Conv", "Gemm") else None
        if src is not None and src.op_type == "DequantizeLinear":
            q, scale = inits[src.input[0]], inits[src.input[1]]
            zero = inits[src.input[2]] if len(src.input) > 2 else np.zeros(1)
            assert q.dtype == np.int8 and np.all(zero == 0), n.name  # symmetric int8, zero point 0
            found.append((n.name, q, scale))
    return found


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("full_range", [False, True])
def test_fake_quant_weights_are_orts_int8_weights(tmp_path: Path, full_range: bool) -> None:
    model = small_net()
    calibration = np.random.default_rng(0).random((64, *SHAPE), dtype=np.float32)
    qdq = ort_weights(int8_file(model, tmp_path, "m", calibration, int8_full_range=full_range))
    prepared = prepare_qat(model, full_range=full_range)
    layers = qat_layers(prepared)
    assert len(layers) == len(qdq) >= 6
    qmax = 127 if full_range else 64
    for path, (node, q, scale) in zip(layers, qdq, strict=True):
        weight = prepared.get_submodule(path).weight.detach()
        assert path.split(".")[0] == node.split("/")[1], (path, node)  # same layer, same stage
        assert tuple(weight.shape) == q.shape, (path, node)
        # ORT's grid: symmetric, |q| reaches qmax in every channel (absmax / scale), never beyond.
        assert np.abs(q).max() == qmax and np.all(np.abs(q).reshape(len(q), -1).max(axis=1) == qmax)
        ours = fake_quant_weight(weight, full_range=full_range).numpy()
        theirs = q.astype(np.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7, err_msg=f"{path} vs {node}")
        # And the same integers: one rounding step off would be a whole scale apart.
        ours_q = np.rint(ours / scale.reshape(-1, *[1] * (q.ndim - 1)))
        assert np.array_equal(ours_q, q.astype(np.float32)), (path, node)


def test_faked_layers_are_the_layers_ort_quantizes(tmp_path: Path) -> None:
    model = small_net()
    calibration = np.random.default_rng(1).random((32, *SHAPE), dtype=np.float32)
    for keep_float in ([], ["2"], ["1", "2"]):
        prepared = prepare_qat(model, keep_float=keep_float, full_range=False)
        layers = qat_layers(prepared)
        assert "0.0" not in layers and "7" not in layers  # the stem conv and the classifier stay float
        assert not [p for p in layers if p.split(".")[0] in keep_float]
        qdq = ort_weights(
            int8_file(model, tmp_path, "k" + "".join(keep_float), calibration, keep_float=keep_float)
        )
        # Per top-level child: as many faked layers as int8 Conv/Gemm nodes in ORT's file.
        assert Counter(p.split(".")[0] for p in layers) == Counter(n.split("/")[1] for n, _, _ in qdq), (
            keep_float
        )
    assert (
        len(qat_layers(prepare_qat(model, keep_float=["1", "2"], full_range=False))) == 1
    )  # only Linear "5"


def test_strip_gives_back_the_model_and_its_onnx_structure(tmp_path: Path) -> None:
    model = small_net()
    x = torch.rand(16, *SHAPE)
    stripped = strip_qat(prepare_qat(model, keep_float=["2"], full_range=True))
    assert not stripped.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in stripped.modules())
    assert {type(m) for m in stripped.modules()} <= {type(m) for m in model.modules()} | {nn.Identity}
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), atol=1e-5, rtol=1e-5)
    a = export_onnx(model, x[:1], tmp_path / "a.onnx", opset=17)
    b = export_onnx(stripped, x[:1], tmp_path / "b.onnx", opset=17)
    assert op_counts(a) == op_counts(b) and op_counts(a)["Conv"] == 7
    names = [sorted(n.name for n in onnx.load(str(p)).graph.node) for p in (a, b)]
    assert names[0] == names[1]  # the "/<k>/..." scopes keep_float selects by


def test_observers_learn_in_train_mode_and_freeze_in_eval() -> None:
    prepared = prepare_qat(small_net(), full_range=False)
    layer = prepared.get_submodule(qat_layers(prepared)[0])
    before = prepared.eval()(torch.rand(4, *SHAPE))  # never trained: activations pass unquantized
    assert not bool(layer.observed)
    prepared.train()(torch.rand(8, *SHAPE) * 3)
    low, high = float(layer.act_min), float(layer.act_max)
    assert bool(layer.observed) and low <= 0.0 < high
    prepared.eval()(torch.rand(8, *SHAPE) * 100)
    assert (float(layer.act_min), float(layer.act_max)) == (low, high)
    assert before.shape == (4, 10)


def test_keep_float_names_a_top_level_module() -> None:
    for bad in ("9", "1.0", ""):
        with pytest.raises(
            ValueError, match=r"keep_float: .* is not a top-level module.*allowed: 0, 1, 2"
        ) as err:
            prepare_qat(small_net(), keep_float=[bad], full_range=False)
        assert "\n" not in str(err.value) and repr(bad) in str(err.value)


# ---- QAT against PTQ on digits, 7-bit weights (reduce_range) ----
#
# A plainly trained small CNN on digits loses nothing to PTQ here (measured: float 0.9457, PTQ 0.9497),
# so there is nothing for QAT to recover. The test makes PTQ hurt the documented way instead: a
# cross-layer range imbalance (Nagel et al. 2019, data-free quantization; MobileNet's depthwise
# outputs): two depthwise channels' BN scaled by 100 and the next pointwise conv's inputs by 1/100.
# The float function is unchanged (ReLU is positively homogeneous), but ORT's per-tensor uint8
# activation grid after that ReLU is now 100x coarser for the other channels.

_IMBALANCE = 100.0


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


def test_qat_recovers_what_ptq_loses_on_digits(tmp_path: Path) -> None:
    digits = load_digits()
    x_all = (digits.images / 16.0).astype(np.float32)[:, None]
    y_all = digits.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x_all))
    train, test = perm[:1300], perm[1300:]
    x, y = torch.from_numpy(x_all[train]), torch.from_numpy(y_all[train])
    calibration = x_all[train[:256]]

    def accuracy(path: Path) -> float:
        return onnx_accuracy(path, x_all[test], y_all[test])

    model = small_net(seed=0, width=8)
    for m in model.modules():  # fresh BN for training
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
    _train(model, x, y, epochs=15, lr=1e-2)
    float_acc = accuracy(export_onnx(model, x[:1], tmp_path / "float.onnx", opset=17))
    # Stage "2" is one DepthwiseSeparable: "2.0.0" its depthwise ConvBNReLU, "2.0.1" its pointwise one.
    depthwise_bn, pointwise = model.get_submodule("2.0.0.1"), model.get_submodule("2.0.1.0")
    assert (
        isinstance(depthwise_bn, nn.BatchNorm2d)
        and isinstance(pointwise, nn.Conv2d)
        and pointwise.groups == 1
    )
    with torch.no_grad():
        depthwise_bn.weight[:2] *= _IMBALANCE
        depthwise_bn.bias[:2] *= _IMBALANCE
        pointwise.weight[:, :2] /= _IMBALANCE
    imbalanced_acc = accuracy(export_onnx(model, x[:1], tmp_path / "imbalanced.onnx", opset=17))
    ptq_acc = accuracy(int8_file(model, tmp_path, "ptq", calibration))

    prepared = prepare_qat(model, full_range=False)
    _train(prepared, x, y, epochs=4, lr=1e-3)
    qat_acc = accuracy(int8_file(strip_qat(prepared), tmp_path, "qat", calibration))
    # Control: the same fine-tune (same batches) without fake quantization, then PTQ.
    control = copy.deepcopy(model)
    _train(control, x, y, epochs=4, lr=1e-3)
    control_acc = accuracy(int8_file(control, tmp_path, "control", calibration))
    print(
        f"digits accuracy (ORT, {len(test)} images): float {float_acc:.4f}, imbalanced float {imbalanced_acc:.4f}, "
        f"PTQ int8 {ptq_acc:.4f}, float fine-tune + PTQ {control_acc:.4f}, QAT int8 {qat_acc:.4f}"
    )
    assert float_acc >= 0.9 and abs(imbalanced_acc - float_acc) <= 0.005  # same function
    assert ptq_acc <= float_acc - 0.03  # PTQ hurts: there is something to recover
    # Within 1.5 points of float (measured 0.4-0.6 below): weights-only fake quantization got 2 below.
    assert qat_acc >= ptq_acc + 0.02 and qat_acc >= float_acc - 0.015
    assert qat_acc > control_acc  # the fake quantization, not the extra epochs, recovers it
