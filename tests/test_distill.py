"""Knowledge distillation building blocks (evaluators/distill.py and its use in evaluators/train.py).

Real torch, real ONNX Runtime, real Lightning: the loss's algebra, a teacher read from an ONNX file
this test exports, distilled training on the digits data, and the shared, cached teacher of a sweep.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.evaluators.distill import (
    Distillation,
    OnnxTeacher,
    distillation_loss,
    shared_teacher,
    teacher_key,
)
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.train import ClassifierModule, fit

FIT = dict(lr=0.01, optimizer="adam", weight_decay=0.0, accelerator="cpu", compute_slot=False)


def _net(channels: int = 1, classes: int = 10, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def _digits() -> Any:
    from hwnas.evaluators.data import DigitsData

    data = DigitsData(resolution=16, channels=1, val_fraction=0.15, test_fraction=0.15, batch_size=64, seed=0)
    data.setup()
    return data


def _synthetic() -> Any:
    from hwnas.evaluators.data import SyntheticData

    data = SyntheticData(n_samples=200, num_classes=4, resolution=8, channels=1, val_fraction=0.2, test_fraction=0.2,
                         batch_size=32, seed=0, noise=0.5)
    data.setup()
    return data


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A 1x16x16 -> 10 class teacher exported from torch (random weights: the logits are what is compared)."""
    torch.manual_seed(0)
    model = _net(width=8).eval()
    path = export_onnx(model, torch.randn(1, 1, 16, 16), tmp_path_factory.mktemp("teacher") / "teacher.onnx", opset=17)
    return path, model


# ---- the loss ----


def test_loss_weight_zero_is_cross_entropy_and_identical_logits_give_no_kl() -> None:
    torch.manual_seed(0)
    student, teacher, y = torch.randn(12, 5), torch.randn(12, 5), torch.randint(0, 5, (12,))
    for smoothing in (0.0, 0.1):
        got = distillation_loss(student, teacher, y, temperature=3.0, weight=0.0, label_smoothing=smoothing)
        assert torch.equal(got, F.cross_entropy(student, y, label_smoothing=smoothing))
    assert distillation_loss(student, student.clone(), y, temperature=2.5, weight=1.0).item() == 0.0
    # The soft term by hand: T^2 * mean over rows of sum p_t * (log p_t - log p_s), at temperature T.
    t = 4.0
    p_t = F.softmax(teacher / t, dim=1)
    by_hand = (t * t) * (p_t * (F.log_softmax(teacher / t, dim=1) - F.log_softmax(student / t, dim=1))).sum(1).mean()
    mixed = 0.3 * F.cross_entropy(student, y) + 0.7 * by_hand
    assert torch.allclose(distillation_loss(student, teacher, y, temperature=t, weight=0.7), mixed, atol=1e-6)
    assert distillation_loss(student, teacher, y, temperature=t, weight=1.0).item() > 0


def test_loss_gradient_reaches_the_student_only() -> None:
    torch.manual_seed(1)
    student = torch.randn(8, 4, requires_grad=True)
    teacher = torch.randn(8, 4, requires_grad=True)
    distillation_loss(student, teacher, torch.randint(0, 4, (8,)), temperature=2.0, weight=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_loss_and_settings_refuse_bad_values_in_one_line(teacher_file: tuple[Path, nn.Module]) -> None:
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^distillation: the student gives logits \(2, 3\) and the teacher \(2, 4\); "):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), y, temperature=1.0, weight=0.5)
    teacher = OnnxTeacher(teacher_file[0])
    for bad in (0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match=r"^distill\.temperature: .* allowed: a finite number > 0$"):
            Distillation(teacher, temperature=bad, weight=0.5)  # type: ignore[arg-type]
    for bad in (-0.1, 1.5, float("nan"), False):
        with pytest.raises(ValueError, match=r"^distill\.weight: .* allowed: a number with 0 <= weight <= 1$"):
            Distillation(teacher, temperature=2.0, weight=bad)
    kept = Distillation(teacher, temperature=2, weight=1)
    assert (kept.temperature, kept.weight) == (2.0, 1.0) and isinstance(kept.temperature, float)


# ---- the ONNX teacher ----


def test_onnx_teacher_gives_the_torch_models_logits_and_survives_pickle(teacher_file: tuple[Path, nn.Module]) -> None:
    path, model = teacher_file
    teacher = OnnxTeacher(path)
    assert teacher.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher.input_shape[1:] == (1, 16, 16) and teacher.output_shape[1] == 10
    torch.manual_seed(2)
    x = torch.randn(7, 1, 16, 16, requires_grad=True)
    with torch.no_grad():
        expected = model(x)
    got = teacher.logits(x)
    assert got.dtype == torch.float32 and got.shape == (7, 10) and not got.requires_grad
    assert torch.allclose(got, expected, atol=1e-4)
    teacher.check_fits((1, 16, 16), 10)  # fits: no error
    again = pickle.loads(pickle.dumps(teacher))  # after use: its session is open, and not pickled
    assert again._session is None and again.sha256 == teacher.sha256
    assert torch.allclose(again.logits(x[:3]), expected[:3], atol=1e-4)


def test_onnx_teacher_refuses_data_it_does_not_fit(teacher_file: tuple[Path, nn.Module]) -> None:
    teacher = OnnxTeacher(teacher_file[0])
    for shape, classes in [((3, 16, 16), 10), ((1, 16, 16), 4), ((1, 8, 8), 10)]:
        with pytest.raises(ValueError) as err:
            teacher.check_fits(shape, classes)
        text = str(err.value)
        assert "\n" not in text and text.startswith("compression.distill.teacher: ")
        assert "(batch, 1, 16, 16)" in text and "(batch, 10)" in text  # the teacher's shapes
        assert f"({shape[0]}, {shape[1]}, {shape[2]}) in {classes} classes" in text  # the data's
        assert f"allowed: a teacher taking (N, {shape[0]}, {shape[1]}, {shape[2]}) and giving (N, {classes})" in text


def test_onnx_teacher_refuses_a_corrupt_or_missing_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(512))
    for path in (corrupt, tmp_path / "missing.onnx", tmp_path):
        with pytest.raises(ValueError) as err:
            OnnxTeacher(path)
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"compression.distill.teacher: {path}: ")


# ---- training with a teacher ----


def _student_weights(data: Any, distill: Distillation | None) -> list[torch.Tensor]:
    torch.manual_seed(5)
    student = _net(width=4)
    fit(student, data, epochs=1, seed=0, distill=distill, **FIT)  # type: ignore[arg-type]
    return [p.detach().clone() for p in student.parameters()]


def test_fit_with_a_teacher_trains_differently_and_weight_zero_changes_nothing(
    teacher_file: tuple[Path, nn.Module],
) -> None:
    data = _digits()
    teacher = OnnxTeacher(teacher_file[0])
    plain = _student_weights(data, None)
    off = _student_weights(data, Distillation(teacher, temperature=4.0, weight=0.0))
    distilled = _student_weights(data, Distillation(teacher, temperature=4.0, weight=0.9))
    assert all(torch.equal(a, b) for a, b in zip(plain, off, strict=True))
    assert max((a - b).abs().max().item() for a, b in zip(plain, distilled, strict=True)) > 1e-3
    # The module's loss is distillation_loss on the teacher's logits for the very batch it is given.
    torch.manual_seed(6)
    x, y, student = torch.randn(5, 1, 16, 16), torch.randint(0, 10, (5,)), _net(width=4)
    settings = Distillation(teacher, temperature=2.0, weight=0.6)
    loss = ClassifierModule(student, lr=0.01, optimizer="adam", weight_decay=0.0, epochs=1, label_smoothing=0.1,
                            distill=settings).training_step((x, y), 0)
    expected = distillation_loss(student(x), teacher.logits(x), y, temperature=2.0, weight=0.6, label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    # A teacher that does not fit the data is refused before any training.
    with pytest.raises(ValueError, match=r"^compression\.distill\.teacher: .* in 4 classes; allowed"):
        fit(_net(classes=4), _synthetic(), epochs=1, seed=0, distill=settings, **FIT)  # type: ignore[arg-type]


# ---- the shared teacher of a sweep ----


def test_shared_teacher_is_trained_once_per_key_and_written_whole(tmp_path: Path) -> None:
    data = _synthetic()
    built: list[int] = []
    lines: list[str] = []

    def build() -> nn.Module:
        built.append(1)
        torch.manual_seed(0)
        return _net(classes=4)

    settings = {"candidate": {"width": 4}, "epochs": 1, "seed": 0, "lr": 0.01}
    key = teacher_key(data.fingerprint, settings)
    assert key == teacher_key(data.fingerprint, dict(reversed(list(settings.items()))))  # order does not matter
    assert key != teacher_key(data.fingerprint, {**settings, "seed": 1}) != teacher_key("0" * 16, settings)
    cache = tmp_path / "teachers"
    kwargs: dict[str, Any] = dict(cache_dir=cache, epochs=1, seed=0, fit_kwargs=FIT, progress=lines.append)

    first = shared_teacher(build, data, key=key, settings=settings, **kwargs)
    assert first == cache / f"teacher-{key}.onnx" and len(built) == 1
    record = json.loads((cache / f"teacher-{key}.json").read_text())
    assert 0.0 <= record["val_accuracy"] <= 1.0
    assert record["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert record["data_fingerprint"] == data.fingerprint and record["settings"] == settings
    assert record["split"] == "train" and record["epochs"] == 1
    assert not list(cache.glob("*.tmp"))
    OnnxTeacher(first).check_fits(data.input_shape, data.num_classes)  # a loadable teacher that fits the data
    assert lines[0].startswith("[hwnas] distillation teacher: training 1 epochs")
    mtime = first.stat().st_mtime_ns

    assert shared_teacher(build, data, key=key, **kwargs) == first
    assert len(built) == 1 and first.stat().st_mtime_ns == mtime
    assert lines[-1] == f"[hwnas] distillation teacher: reused {first} (val acc {record['val_accuracy']:.4f})"

    other = teacher_key(data.fingerprint, {**settings, "seed": 1})
    assert shared_teacher(build, data, key=other, **kwargs) == cache / f"teacher-{other}.onnx" and len(built) == 2

    # A writer killed mid-export leaves a temp file, never a teacher; a final file without its record
    # (or not matching it) is not trusted either: each is trained again.
    third = teacher_key(data.fingerprint, {**settings, "seed": 2})
    (cache / f".teacher-{third}.abc123.onnx.tmp").write_bytes(first.read_bytes()[:100])
    assert shared_teacher(build, data, key=third, **kwargs).is_file() and len(built) == 3
    assert not list(cache.glob("*.tmp"))
    (cache / f"teacher-{third}.onnx").write_bytes(b"half a file")
    shared_teacher(build, data, key=third, **kwargs)
    assert len(built) == 4
    (cache / f"teacher-{third}.json").unlink()
    shared_teacher(build, data, key=third, **kwargs)
    assert len(built) == 5 and OnnxTeacher(cache / f"teacher-{third}.onnx").sha256 == json.loads(
        (cache / f"teacher-{third}.json").read_text())["sha256"]

    with pytest.raises(ValueError, match=r"^shared_teacher: fit_kwargs sets split; allowed"):
        shared_teacher(build, data, key=key, cache_dir=cache, epochs=1, seed=0, fit_kwargs={**FIT, "split": "val"})
