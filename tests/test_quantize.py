from __future__ import annotations

import filecmp

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hwnas.evaluators.data import DigitsData
from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.quantize import FORMATS, compress_onnx
from hwnas.evaluators.train import fit


def digits_cnn() -> nn.Module:
    # Big enough (~40k weights) that int8 weights outweigh the QDQ bookkeeping in the file.
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dm = DigitsData(resolution=16, channels=1, val_fraction=0.15, test_fraction=0.15, batch_size=64, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small CNN trains fastest single-threaded, and never oversubscribes
    try:
        torch.manual_seed(0)  # the initial weights too: the same network in every run of the suite
        model = fit(
            digits_cnn(),
            dm,
            epochs=3,
            lr=3e-3,
            optimizer="adam",
            weight_decay=1e-4,
            accelerator="cpu",
            seed=0,
        )
    finally:
        torch.set_num_threads(threads)
    d = tmp_path_factory.mktemp("quant")
    fp32 = export_onnx(model, torch.from_numpy(dm.arrays("train")[0][:1]), d / "fp32.onnx", opset=17)
    calibration = dm.arrays("train")[0][:256]
    # fp16 is made for a target that computes in it (CUDA); this CPU would refuse it (test_formats.py).
    files = {
        fmt: compress_onnx(
            fp32, fmt, calibration, d / f"{fmt}.onnx", provider="cuda" if fmt == "fp16" else "cpu"
        )
        for fmt in FORMATS
    }
    x, y = dm.arrays("val")
    accuracy = {fmt: onnx_accuracy(path, x, y) for fmt, path in files.items()}
    return fp32, files, accuracy


def size(path) -> int:
    return path.stat().st_size


def test_fp32_is_a_copy_and_learned(trained):
    fp32, files, accuracy = trained
    assert filecmp.cmp(fp32, files["fp32"], shallow=False)
    assert accuracy["fp32"] > 0.8


def test_int8_is_smaller_and_within_two_points(trained):
    _, files, accuracy = trained
    assert size(files["int8"]) < 0.5 * size(files["fp32"])
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= 0.02
    graph = onnx.load(str(files["int8"])).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "conv weights should be stored as int8"
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    # The stem conv and the classifier keep float32 weights; every other conv's weight is dequantized int8.
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    head = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    assert convs[0].input[1] not in dequantized and head.input[1] not in dequantized
    assert all(c.input[1] in dequantized for c in convs[1:])


def test_fp16_is_about_half_and_keeps_float32_io(trained):
    _, files, accuracy = trained
    assert 0.4 < size(files["fp16"]) / size(files["fp32"]) < 0.6
    assert abs(accuracy["fp16"] - accuracy["fp32"]) <= 0.01
    graph = onnx.load(str(files["fp16"])).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int4_is_weight_only_linear_layers_and_convs_stay_float(trained):
    fp32, files, accuracy = trained
    graph = onnx.load(str(files["int4"])).graph
    ops = [n.op_type for n in graph.node]
    # The classifier (torch.nn.Linear, a Gemm) became MatMulNBits + Add; no Gemm, no QDQ left.
    assert ops.count("MatMulNBits") == 1 and "Gemm" not in ops
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(_initializer(graph, c.input[1]).data_type == onnx.TensorProto.FLOAT for c in convs)
    assert abs(accuracy["int4"] - accuracy["fp32"]) <= 0.02


def _initializer(graph, name):
    return next(t for t in graph.initializer if t.name == name)


def test_dynamic_batch_axis(trained):
    import onnxruntime as ort

    _, files, _ = trained
    for path in files.values():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        for n in (1, 5):
            (out,) = session.run(None, {"input": np.zeros((n, 1, 16, 16), np.float32)})
            assert out.shape == (n, 10)


def test_unknown_format_lists_formats(trained, tmp_path):
    fp32, _, _ = trained
    with pytest.raises(ValueError, match="fp32, fp16, int8, int4"):
        compress_onnx(fp32, "int2", np.zeros((1, 1, 16, 16), np.float32), tmp_path / "x.onnx")


def test_bad_calibration_array(trained, tmp_path):
    fp32, _, _ = trained
    with pytest.raises(ValueError, match="calibration"):
        compress_onnx(fp32, "int8", np.zeros((0, 1, 16, 16), np.float32), tmp_path / "x.onnx")


def test_every_format_is_a_valid_self_contained_onnx_file(trained):
    # What hwnas writes must pass the same check a model from elsewhere gets (onnx.checker, no
    # external data): the fp16 converter's Casts used to come after their consumers.
    from hwnas.evaluators.onnx_check import load_checked

    _, files, _ = trained
    for fmt, path in files.items():
        assert load_checked(path) == path.read_bytes(), fmt
