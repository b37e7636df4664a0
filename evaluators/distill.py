"""Knowledge distillation (Hinton et al. 2015): a student trained on a mix of the labels and a
teacher's softened outputs.

Config (wired by the pipeline): `compression.distill.teacher` is null (off), a path to an ONNX file, or
"train" (one teacher trained per sweep on the train split, shared by all trials and cached by the data
fingerprint and its settings: `shared_teacher`); `compression.distill.temperature` / `.weight` are the
fixed values, searchable per candidate as `distill.temperature` / `distill.weight`.

A teacher is only ever run with ONNX Runtime from a checked, self-contained ONNX file
(`evaluators.onnx_check.load_checked`): no pickled checkpoint is ever loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.evaluators.onnx_check import OnnxFileError, load_checked

if TYPE_CHECKING:
    from hwnas.evaluators.data import DataRecipe

TEACHER_KEY = "compression.distill.teacher"
KEY_CHARS = 16

Dim: TypeAlias = int | str  # a fixed size, or the name of a dynamic axis ("?" when it has none)


def _dims(value_info: Any) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return tuple(dims)


def _shape_text(dims: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


class OnnxTeacher:
    """A teacher network from an ONNX file, run with ONNX Runtime (CPU, one intra-op thread).

    The file is read once and checked (`load_checked`); its bytes travel with the object when pickled
    (to Ray workers), the ONNX Runtime session does not: it is made on first use in each process."""

    def __init__(self, path: str | Path) -> None:
        import onnx

        self.path = str(path)
        try:
            data = load_checked(path)
        except OnnxFileError as exc:
            raise OnnxFileError(f"{TEACHER_KEY}: {exc}") from None
        model = onnx.load_model_from_string(data)
        graph = model.graph
        stored = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in stored]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise OnnxFileError(
                f"{TEACHER_KEY}: {self.path}: the model has {len(inputs)} inputs and {len(graph.output)} outputs; "
                "allowed: one input (N, C, H, W) and one output (N, classes)"
            )
        if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise OnnxFileError(f"{TEACHER_KEY}: {self.path}: the input is not float32; allowed: a float32 NCHW input")
        self._bytes = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.input_name = inputs[0].name
        self.input_shape: tuple[Dim, ...] = _dims(inputs[0])
        self.output_shape: tuple[Dim, ...] = _dims(graph.output[0])
        self._session: Any = None

    def __repr__(self) -> str:
        return f"OnnxTeacher({self.path!r}, sha256={self.sha256[:12]}...)"

    def check_fits(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        """ValueError (one line) unless the teacher takes (N, C, H, W) items of `input_shape` (N dynamic
        or 1; a dynamic C, H or W fits any size) and gives (N, num_classes) logits."""
        c, h, w = input_shape
        ins, outs = self.input_shape, self.output_shape
        fits_in = len(ins) == 4 and (isinstance(ins[0], str) or ins[0] == 1) and all(
            isinstance(have, str) or have == want for have, want in zip(ins[1:], (c, h, w), strict=True)
        )
        fits_out = len(outs) == 2 and (isinstance(outs[1], str) or outs[1] == num_classes)
        if not (fits_in and fits_out):
            raise ValueError(
                f"{TEACHER_KEY}: {self.path} takes input {_shape_text(ins)} and gives output {_shape_text(outs)}, "
                f"but the data's items are {_shape_text(input_shape)} in {num_classes} classes; allowed: a teacher "
                f"taking (N, {c}, {h}, {w}) and giving (N, {num_classes}), N dynamic or 1"
            )

    def _opened(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self._bytes, sess_options=options, providers=["CPUExecutionProvider"])
        return self._session

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits for `x` (float32 NCHW), on `x`'s device; no gradient."""
        session = self._opened()
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if isinstance(self.input_shape[0], int) and self.input_shape[0] == 1 and len(batch) != 1:
            rows = [session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(len(batch))]
            out = np.concatenate(rows, axis=0)
        else:
            out = session.run(None, {self.input_name: batch})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # not picklable; each process opens its own
        return state


def _check_temperature(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"distill.temperature: {value!r} is invalid; allowed: a finite number > 0")
    return float(value)


def _check_weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"distill.weight: {value!r} is invalid; allowed: a number with 0 <= weight <= 1")
    return float(value)


@dataclass(frozen=True)
class Distillation:
    """What a distilled training run uses: the teacher, the softmax temperature T (> 0) and the weight
    (0..1) of the distillation term against the labels' cross-entropy (`distillation_loss`)."""

    teacher: OnnxTeacher
    temperature: float
    weight: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", _check_temperature(self.temperature))
        object.__setattr__(self, "weight", _check_weight(self.weight))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    weight: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(1 - weight) * CE(student, targets; label_smoothing)
    + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)), KL averaged over the batch.
    The T^2 keeps the soft term's gradients on the scale of the hard one's as T changes (Hinton et al.
    2015). The teacher's logits are constants: no gradient reaches them."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation: the student gives logits {tuple(student_logits.shape)} and the teacher "
            f"{tuple(teacher_logits.shape)}; allowed: the same shape (N, classes)"
        )
    t = _check_temperature(temperature)
    w = _check_weight(weight)
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - w) * hard + w * (t * t) * soft


def teacher_key(data_fingerprint: str, settings: Mapping[str, Any]) -> str:
    """A short, stable hash of the data and the shared teacher's settings (its candidate, epochs, seed,
    lr, ...): the name `shared_teacher` caches the teacher under. Key order does not matter."""
    text = json.dumps({"data": data_fingerprint, "settings": dict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(onnx_path: Path, meta_path: Path) -> dict[str, Any] | None:
    """The teacher's record when both files are there and the record's sha256 is the file's."""
    if not (onnx_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != _sha256_file(onnx_path):
        return None
    return meta


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    """An exclusive lock on `path` (created): two sweeps sharing a cache folder train a teacher once."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _temp(folder: Path, prefix: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(name)


def shared_teacher(
    build: Callable[[], nn.Module],
    data: DataRecipe,
    *,
    cache_dir: Path,
    key: str,
    epochs: int,
    seed: int,
    fit_kwargs: Mapping[str, Any],
    progress: Callable[[str], None] = print,
    settings: Mapping[str, Any] | None = None,
    opset: int = 17,
) -> Path:
    """`cache_dir / f"teacher-{key}.onnx"`, trained only when it is not there yet (`key`: `teacher_key`).

    Training: `build()` fitted by `train.fit` for `epochs` with `seed` on the train split only (val is
    what the search ranks on; test is never seen), with `fit_kwargs` (lr, optimizer, weight_decay,
    accelerator, ...); exported to ONNX, its val accuracy measured with ONNX Runtime on that file.
    Beside it, `teacher-{key}.json`: key, data fingerprint, settings, epochs, seed, fit_kwargs, val
    accuracy, sha256 of the ONNX file. Both are written to temporary files in `cache_dir` and renamed
    into place (the record first), so a kill mid-write leaves no file a later sweep trusts: a teacher is
    reused only when its record's sha256 is the file's. Holds `teacher-{key}.lock` while it works."""
    from hwnas.evaluators import train
    from hwnas.evaluators.onnx_accuracy import onnx_accuracy
    from hwnas.evaluators.onnx_export import export_onnx

    reserved = sorted({"split", "epochs", "seed", "distill"} & set(fit_kwargs))
    if reserved:
        raise ValueError(f"shared_teacher: fit_kwargs sets {', '.join(reserved)}; allowed: the other arguments of train.fit")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = cache_dir / f"teacher-{key}.onnx"
    meta_path = cache_dir / f"teacher-{key}.json"
    tag = "[hwnas] distillation teacher:"
    with _locked(cache_dir / f"teacher-{key}.lock"):
        meta = _cached(onnx_path, meta_path)
        if meta is not None:
            progress(f"{tag} reused {onnx_path} (val acc {meta.get('val_accuracy', float('nan')):.4f})")
            return onnx_path
        # Leftovers of a killed writer of this key (we hold its lock: nobody else is writing them).
        for stale in cache_dir.glob(f".teacher-{key}.*.tmp"):
            stale.unlink(missing_ok=True)
        data.setup()
        progress(f"{tag} training {epochs} epochs on the train split (key {key}) ...")
        started = time.perf_counter()
        model = train.fit(build(), data, epochs=epochs, seed=seed, split="train", **dict(fit_kwargs))
        train_s = time.perf_counter() - started
        tmp_onnx = _temp(cache_dir, f".teacher-{key}.", ".onnx.tmp")
        tmp_meta = _temp(cache_dir, f".teacher-{key}.", ".json.tmp")
        try:
            example = torch.from_numpy(data.sample("train", 1, seed))
            export_onnx(model, example, tmp_onnx, opset=opset)
            load_checked(tmp_onnx)  # what OnnxTeacher will require of it
            x, y = data.arrays("val")
            accuracy = float(onnx_accuracy(tmp_onnx, x, y))
            record = {
                "key": key,
                "data_fingerprint": data.fingerprint,
                "settings": dict(settings) if settings is not None else None,
                "epochs": epochs,
                "seed": seed,
                "split": "train",
                "fit_kwargs": dict(fit_kwargs),
                "opset": opset,
                "val_accuracy": accuracy,
                "sha256": _sha256_file(tmp_onnx),
                "train_s": round(train_s, 3),
            }
            tmp_meta.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
            os.replace(tmp_meta, meta_path)
            os.replace(tmp_onnx, onnx_path)
        finally:
            tmp_onnx.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
    progress(f"{tag} wrote {onnx_path} (val acc {accuracy:.4f}, {train_s:.1f} s)")
    return onnx_path
