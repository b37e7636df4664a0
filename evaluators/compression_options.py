"""The `compression:` block: compression done by training (issue 13, items 2 and 3), checked without torch.

    compression:
      pin_first_last: true   # int8: the first conv and the classifier stay fp32 (false: quantized too)
      qat_epochs: 0          # int8 candidates: epochs of quantization-aware fine-tuning after PTQ (0: PTQ only)
      qat_lr_scale: 0.1      # QAT's learning rate = the candidate's lr x this
      distill:
        teacher: null        # null | an ONNX file (run with ONNX Runtime) | train (one per data fingerprint, shared)
        temperature: 4.0     # when space.distill does not search distill.temperature
        weight: 0.5          # when space.distill does not search distill.weight
        teacher_epochs: 10   # teacher: train
        teacher_candidate: null   # teacher: train; a candidate of the space, null: the space's largest network
        cache_dir: null      # teacher: train; a folder shared between sweeps (null: the run folder only)

The searched knobs are the space's (`space.distill`, spaces/training.py); this block holds the fixed
settings and the teacher. The driver checks it (search/config.py) before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEYS = ("pin_first_last", "qat_epochs", "qat_lr_scale", "distill")
DISTILL_KEYS = ("teacher", "temperature", "weight", "teacher_epochs", "teacher_candidate", "cache_dir")
TRAIN_TEACHER = "train"
MAX_EPOCHS = 10_000


@dataclass(frozen=True)
class CompressionSettings:
    pin_first_last: bool = True
    qat_epochs: int = 0
    qat_lr_scale: float = 0.1
    teacher: str | None = None  # None, "train", or the path of an ONNX file
    temperature: float = 4.0
    weight: float = 0.5
    teacher_epochs: int = 10
    teacher_candidate: dict[str, Any] | None = None
    cache_dir: str | None = None

    @property
    def is_default(self) -> bool:
        return self == CompressionSettings()

    @property
    def trains_teacher(self) -> bool:
        return self.teacher == TRAIN_TEACHER


_DEFAULT = CompressionSettings()
# Every key's off default, flattened as a run folder's config.yaml is compared on resume
# (search/experiment._same_setting): a folder made before the block existed resumes with it off.
OFF_DEFAULTS: dict[str, Any] = {
    **{f"compression.{key}": getattr(_DEFAULT, key) for key in KEYS if key != "distill"},
    **{f"compression.distill.{key}": getattr(_DEFAULT, key) for key in DISTILL_KEYS},
}


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_EPOCHS:
        raise ValueError(f"compression.{key}: {value!r} is not allowed; allowed: an int {low}..{MAX_EPOCHS}")
    return value


def _float(key: str, value: Any, ok: Any, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"compression.{key}: {value!r} is not allowed; allowed: {allowed}")
    return float(value)


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf  # comes with Hydra

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def from_config(node: Any) -> CompressionSettings:
    """`compression` as Hydra hands it (or None: all off) -> CompressionSettings; one-line ValueError
    naming the key, the value and what is allowed."""
    node = _plain(node)
    if node is None:
        return CompressionSettings()
    if not isinstance(node, Mapping):
        raise ValueError(f"compression: {node!r} is not a mapping; allowed: a mapping of {', '.join(KEYS)}")
    for key in node:
        if key not in KEYS:
            raise ValueError(f"compression.{key}: unknown key; allowed: {', '.join(KEYS)}")
    distill = node.get("distill") or {}
    if not isinstance(distill, Mapping):
        raise ValueError(f"compression.distill: {distill!r} is not a mapping; allowed: a mapping of {', '.join(DISTILL_KEYS)}")
    for key in distill:
        if key not in DISTILL_KEYS:
            raise ValueError(f"compression.distill.{key}: unknown key; allowed: {', '.join(DISTILL_KEYS)}")
    teacher = distill.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        raise ValueError(f"compression.distill.teacher: {teacher!r} is not allowed; allowed: null, train, or the path of an ONNX file")
    if teacher is not None and teacher != TRAIN_TEACHER:
        path = Path(teacher).expanduser()
        if not path.is_file():
            raise ValueError(f"compression.distill.teacher: {teacher!r} is not a file; allowed: null, train, or the path of an ONNX file")
        teacher = str(path.resolve())
    candidate = distill.get("teacher_candidate")
    if candidate is not None and not isinstance(candidate, Mapping):
        raise ValueError(f"compression.distill.teacher_candidate: {candidate!r} is not a mapping; allowed: null or a candidate of the space")
    cache_dir = distill.get("cache_dir")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir.strip()):
        raise ValueError(f"compression.distill.cache_dir: {cache_dir!r} is not allowed; allowed: null or a folder path")
    pin = node.get("pin_first_last", _DEFAULT.pin_first_last)
    if not isinstance(pin, bool):
        raise ValueError(f"compression.pin_first_last: {pin!r} is not allowed; allowed: true, false")
    return CompressionSettings(
        pin_first_last=pin,
        qat_epochs=_int("qat_epochs", node.get("qat_epochs", _DEFAULT.qat_epochs), 0),
        qat_lr_scale=_float("qat_lr_scale", node.get("qat_lr_scale", _DEFAULT.qat_lr_scale), lambda v: v > 0,
                            "a finite float > 0"),
        teacher=teacher,
        temperature=_float("distill.temperature", distill.get("temperature", _DEFAULT.temperature), lambda v: v > 0,
                           "a finite float > 0"),
        weight=_float("distill.weight", distill.get("weight", _DEFAULT.weight), lambda v: 0 <= v <= 1,
                      "a float 0 <= w <= 1"),
        teacher_epochs=_int("distill.teacher_epochs", distill.get("teacher_epochs", _DEFAULT.teacher_epochs), 1),
        teacher_candidate=dict(candidate) if candidate is not None else None,
        cache_dir=str(Path(cache_dir).expanduser()) if cache_dir is not None else None,
    )
