"""One trial end to end: build -> [early: the untrained file's latency] -> train -> factorize -> prune -> fine-tune -> export -> compress -> QAT -> ORT
accuracy -> latency (factorize: the space's low-rank knob, evaluators/lowrank.py; QAT: compression.qat_epochs,
evaluators/qat.py). With a distillation teacher (compression.distill.teacher) every fit learns from it too.

The reported accuracy and latency are both measured on the compressed ONNX file left in the trial
directory (model.onnx), so what the search ranks is exactly what would be deployed. A compressed
trial also keeps its fp32 twin (model_fp32.onnx), whose accuracy is `float_val_accuracy`.
With a reporter (search/schedulers/: latency-first, MO-ASHA), the candidate's compressed file is first made
from its untrained weights and timed (`early`): its graph does not depend on the weights, so the scheduler can
reject it over a latency budget before any training; during training, each rung epoch reports a cheap accuracy
(`rung_val_accuracy`, see `_rung_accuracy`) and the scheduler may stop the trial there (TrialStopped).
`retrain` runs the same steps as final training (train + val, no latency); `measure_fresh` times a
file for the export, past the cache.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.evaluators.base import Evaluation, Reporter, TrialStopped
from hwnas.evaluators.compression_options import CompressionSettings
from hwnas.evaluators.data import DataRecipe
from hwnas.evaluators.measure.base import Target
from hwnas.evaluators.measure.plan import LatencyPlan
from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.evaluators.training_options import OPTIMIZERS, check_accelerator
from hwnas.spaces.base import SearchSpace
from hwnas.spaces.candidate import FORMATS, net_id
from hwnas.spaces.training import distill_values, is_train_key, training_values

if TYPE_CHECKING:
    from torch import nn

    from hwnas.evaluators.distill import Distillation, OnnxTeacher

# The driver builds, validates and pickles this evaluator; only workers run it. So torch, Lightning,
# Torch-Pruning and ONNX quantization are imported where a trial runs, not on import: the driver
# starts Ray ~9 s sooner (2 cores), and a tabular sweep never loads them at all.

ARTIFACT_NAME = "model.onnx"
# A compressed model's fp32 twin, kept beside it: the export reports what compression cost.
FLOAT_ARTIFACT_NAME = "model_fp32.onnx"
FINAL_SPLIT = "trainval"  # final training fits on train + val
# What a predicted latency carries about its error (LatencyPlan._predict), for the export's card.
PREDICTION_ERROR_KEYS = ("low_ms", "high_ms", "mape", "within10", "spearman", "n_fit", "outside_range")
STEPS = (
    "data", "build", "early", "train", "factorize", "prune", "finetune", "profile", "export", "compress", "qat", "accuracy", "latency"
)
EVAL_SPLITS = ("val", "test")
# What the file and the way it was made report, in trials and in final training alike.
MODEL_METRICS = (
    "model_bytes",
    "params",
    "macs",
    "total_s",
    "data_load_s",
    "init_loaded_tensors",  # evaluator.init_from only: tensors of the file loaded, and not fitting
    "init_skipped_tensors",
    "lowrank_layers",  # a space with the rank knob on (stage<k>.rank_ratio): layers factorized
)
METRIC_NAMES = frozenset(
    {
        "val_accuracy",
        "float_val_accuracy",  # the fp32 twin's, before compression (fp32: val_accuracy itself)
        "ptq_val_accuracy",  # int8 with compression.qat_epochs: the post-training-quantized file's, before QAT
        "torch_val_accuracy",
        "latency_ms",
        "latency_p90_ms",
        "latency_mean_ms",
        "latency_std_ms",
        "latency_p99_ms",
        "latency_cv",
        "latency_resolution_pct",
        "latency_rounds",
        "latency_runs",
        "latency_others_share",  # share of block boundaries at which another task was runnable
        "latency_disturbed",  # 1: no quiet moment was found in quiet_wait_s (the figure is flagged)
        # How latency_ms was obtained (1/0): from the cache, predicted, or predicted instead of measured
        # because the pre-screen put it far over the budget; with a predictor, its figures beside it.
        "latency_cached",
        "latency_predicted",
        "latency_prescreened",
        "latency_pred_ms",
        "latency_pred_low_ms",
        "latency_pred_high_ms",
        "latency_pred_within10",
        "latency_pred_mape",
        "latency_pred_spearman",
        "latency_pred_n",
        # Latency-first: 1 when latency_ms is the figure of the untrained file made before training, whose graph
        # (evaluators/graph_signature.py) the trained file has too; 0 when the graphs differed and the trained file
        # was timed as well: then the early figure and its gap to the final one beside it.
        "latency_early",
        "latency_early_ms",
        "latency_early_gap_pct",
        "train_epochs",  # training epochs the trial ran (fine-tuning and QAT not counted)
        "energy_j",  # joules per inference, only where the target has a meter (RAPL, NVML)
        *MODEL_METRICS,
        *(f"{step}_s" for step in STEPS),
    }
)


# What retrain reports: both held-out figures of the file and of its fp32 twin; no latency.
RETRAIN_METRIC_NAMES = frozenset(
    {
        "test_accuracy",
        "float_test_accuracy",
        "ptq_test_accuracy",
        "val_accuracy",
        "float_val_accuracy",
        "ptq_val_accuracy",
        "torch_val_accuracy",
        *MODEL_METRICS,
        *(f"{step}_s" for step in STEPS if step not in ("latency", "early")),
    }
)


@dataclass
class _Made:
    """What the shared steps leave: the compressed file, its fp32 twin (None for fp32) and what was counted."""

    artifact: Path
    twin: Path | None
    seed: int
    input_shape: tuple[int, int, int]
    num_classes: int
    params: int
    macs: int
    torch_val_accuracy: float
    data_load_s: float
    train_steps: int = 0  # optimizer steps of the training (fine-tuning not counted)
    factorized: int = 0  # layers factorized by the rank knob (evaluators/lowrank.py)
    ptq: Path | None = None  # with QAT: the post-training-quantized file it improved on (scored, then removed)
    early: _Early | None = None  # with a reporter: the untrained file's measurement

    def scores(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """ORT accuracy of the file, its fp32 twin and (with QAT) the PTQ file on one split: {"": , "float_": , "ptq_": }."""
        score = float(onnx_accuracy(self.artifact, x, y))
        out = {"": score, "float_": float(onnx_accuracy(self.twin, x, y)) if self.twin is not None else score}
        if self.ptq is not None:
            out["ptq_"] = float(onnx_accuracy(self.ptq, x, y))
        return out

    def drop_ptq(self) -> None:
        """The PTQ file has been scored: only its accuracy is kept (the QAT file is the one shipped)."""
        if self.ptq is not None:
            self.ptq.unlink(missing_ok=True)

    def metrics(self) -> dict[str, float]:
        return {
            "torch_val_accuracy": self.torch_val_accuracy,
            "model_bytes": float(self.artifact.stat().st_size),
            "params": float(self.params),
            "macs": float(self.macs),
        }

    def info(self, fmt: str, prune_ratio: float) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "quant": fmt,
            "prune_ratio": prune_ratio,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train_steps": self.train_steps,
        }


@dataclass
class _Early:
    """The candidate's compressed file made from untrained weights and timed before training (latency-first)."""

    path: Path
    stats: Any  # evaluators.measure.protocol.Measurement
    how: dict[str, float]
    metrics: dict[str, float]  # latency_* and how it was obtained, model_bytes, params, macs


def _latency_metrics(stats: Any, how: dict[str, float]) -> dict[str, float]:
    """The latency_* metrics of one Measurement and how it was obtained (cache, predictor)."""
    return dict(
        latency_ms=stats.median_ms,
        latency_p90_ms=stats.p90_ms,
        latency_mean_ms=stats.mean_ms,
        latency_std_ms=stats.std_ms,
        latency_p99_ms=stats.p99_ms,
        latency_cv=stats.cv,
        latency_resolution_pct=stats.resolution_pct,
        latency_rounds=float(stats.rounds),
        latency_runs=float(stats.n_runs),
        **({"latency_others_share": stats.others_share} if stats.others_share is not None else {}),
        **({"latency_disturbed": float(stats.disturbed)} if stats.source != "predicted" else {}),
        **how,
        **({"energy_j": stats.energy_j} if stats.energy_j is not None else {}),
    )


def _distinct_constants(net: nn.Module, seed: int = 0) -> nn.Module:
    """`net` with its BatchNorm statistics and affine terms drawn at random (a private generator: the global RNG,
    and so training, is untouched). Untrained, they are all 0 or 1, and once folded into the convolutions equal
    biases would be one shared constant in the exported file, which the int8 quantizer then rewrites for every
    layer using it: a graph training would not make. Random values keep every constant the layer's own."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return net


def _copy_teacher(source: Path, dest: Path, name: str) -> None:
    """A trained teacher's record and file from one folder to another (the run folder, compression.distill.cache_dir),
    each written whole under a temporary name, the .onnx last: it is what marks the teacher there."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".onnx"):
        if (source / f"{name}{suffix}").is_file():
            tmp = dest / f".{name}{suffix}.part"
            shutil.copyfile(source / f"{name}{suffix}", tmp)
            tmp.replace(dest / f"{name}{suffix}")


@contextmanager
def _timed(metrics: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[f"{step}_s"] = time.perf_counter() - start


def _torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(torch.from_numpy(x[start : start + batch_size]))
            correct += int((logits.argmax(dim=1).numpy() == y[start : start + batch_size]).sum())
    return correct / len(y)


class PipelineEvaluator:
    """Turns a candidate (architecture keys + `prune_ratio` + `quant`) into measured numbers.

    Picklable before and after use: the data loads its arrays lazily on first use in the
    worker process and is set up once per evaluator instance.
    """

    def __init__(
        self,
        *,
        space: SearchSpace,
        data: DataRecipe,
        latency: LatencyPlan | Target,
        seed: int,
        epochs: int,
        finetune_epochs: int,
        lr: float,
        optimizer: str,
        weight_decay: float,
        accelerator: str,
        calibration_samples: int,
        opset: int,
        torch_threads: int,
        init_from: str | None = None,
        init_strict: bool = False,
        compression: CompressionSettings | None = None,
    ) -> None:
        # Every setting is checked here, once, before any trial (ClassifierModule trusts them).
        if epochs < 1:
            raise ValueError(f"evaluator.epochs: {epochs!r} is not allowed; allowed: an int >= 1")
        if finetune_epochs < 0:
            raise ValueError(f"evaluator.finetune_epochs: {finetune_epochs!r} is negative; allowed: an int >= 0")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"evaluator.lr: {lr!r} is not allowed; allowed: a finite float > 0")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"evaluator.weight_decay: {weight_decay!r} is not allowed; allowed: a finite float >= 0")
        if calibration_samples < 1:
            raise ValueError(f"evaluator.calibration_samples: {calibration_samples!r} is not allowed; allowed: an int >= 1")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"evaluator.optimizer: {optimizer!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        if opset < 13:
            raise ValueError(f"evaluator.opset: {opset!r} is too old for per-channel QDQ; allowed: an int >= 13")
        if torch_threads < 1:
            raise ValueError(f"evaluator.torch_threads: {torch_threads!r} is not allowed; allowed: an int >= 1")
        check_accelerator(accelerator)
        self.space = space
        self.data = data
        # A bare target (tests, scripts) is a plan without cache or predictor.
        self.latency = latency if isinstance(latency, LatencyPlan) else LatencyPlan(latency)
        self.seed = seed
        self.epochs = epochs
        self.finetune_epochs = finetune_epochs
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.accelerator = accelerator
        self.calibration_samples = calibration_samples
        self.opset = opset
        self.torch_threads = torch_threads
        # evaluator.init_from: pretrained weights every candidate starts from (evaluators/init_weights.py)
        from hwnas.evaluators.init_weights import check_init_file

        if not isinstance(init_strict, bool):
            raise ValueError(f"evaluator.init_strict: {init_strict!r} is not allowed; allowed: true, false")
        self.init_from = check_init_file(init_from)
        self.init_strict = init_strict
        self.compression = compression or CompressionSettings()
        if self.compression.qat_epochs and "int8" not in getattr(space, "quant", ["int8"]):
            raise ValueError(
                f"compression.qat_epochs: {self.compression.qat_epochs} but space.quant "
                f"({', '.join(getattr(space, 'quant', []))}) has no int8 to train for; allowed: 0, or int8 in space.quant"
            )
        knobs = getattr(space, "train", None)
        if knobs is not None and getattr(knobs, "distills", False) and self.compression.teacher is None:
            raise ValueError("space.distill: distill.* knobs are searched but compression.distill.teacher is null; "
                             "allowed: a teacher (an ONNX file path, or train), or space.distill=null")
        # The teacher: a user's file is checked now; a trained one is made by prepare_teacher (the driver,
        # once the data is known) and travels to the workers as a path.
        self.teacher: OnnxTeacher | None = None
        self.teacher_info: dict[str, Any] | None = None
        if self.compression.teacher is not None and not self.compression.trains_teacher:
            from hwnas.evaluators.distill import OnnxTeacher

            self.teacher = OnnxTeacher(self.compression.teacher)
        self._deadline: float | None = None

    # -- public API -----------------------------------------------------------------------------
    @property
    def metric_names(self) -> frozenset[str]:
        """Every metric `evaluate` reports, so the experiment can check objectives before any trial."""
        return METRIC_NAMES

    def warm_up(self) -> None:
        """Make the data splits now (scikit-learn and all), so that the export at the end does not wait."""
        self.data.setup()

    def prepare_teacher(self, folder: Path, progress: Any = print) -> dict[str, Any] | None:
        """The distillation teacher, before any trial (the driver, after the data is prepared): a user's
        file is checked against the data's input and classes; `train` trains one on the train split into
        `folder` (teacher-<key>.onnx, reused when there: a resume, or a sweep on the same data and settings),
        also kept in compression.distill.cache_dir when set. Returns what the card and config record
        (path, sha256, settings), None without a teacher. One-line ValueError when it does not fit."""
        settings = self.compression
        if settings.teacher is None:
            return None
        from hwnas.evaluators.distill import OnnxTeacher

        self.data.setup()
        shape, classes = self.data.input_shape, self.data.num_classes
        if not settings.trains_teacher:
            assert self.teacher is not None
            self.teacher.check_fits(shape, classes)
            self.teacher_info = {"source": "file", "path": str(self.teacher.path), "sha256": self.teacher.sha256}
            return self.teacher_info
        path, info = self._train_teacher(Path(folder), progress)
        self.teacher = OnnxTeacher(path)
        self.teacher.check_fits(shape, classes)
        self.teacher_info = {"source": "trained", "path": str(path), "sha256": self.teacher.sha256, **info}
        return self.teacher_info

    def _train_teacher(self, folder: Path, progress: Any) -> tuple[Path, dict[str, Any]]:
        from hwnas.evaluators.distill import shared_teacher, teacher_key

        settings = self.compression
        if settings.teacher_candidate is not None:
            try:
                candidate = self.space.architecture(settings.teacher_candidate)  # type: ignore[attr-defined]
            except ValueError as exc:
                raise ValueError(f"compression.distill.teacher_candidate: {exc}") from None
        else:
            largest = getattr(self.space, "largest", None)
            if largest is None:
                raise ValueError(f"compression.distill.teacher_candidate: {type(self.space).__name__} has no largest "
                                 "network to train as teacher; allowed: a candidate of the space")
            candidate = largest()
        fit = {"lr": self.lr, "optimizer": self.optimizer, "weight_decay": self.weight_decay, "accelerator": self.accelerator}
        recipe = {"candidate": candidate, "epochs": settings.teacher_epochs, "seed": self.seed, **fit,
                  "space": type(self.space).__name__}
        key = teacher_key(str(self.data.fingerprint), recipe)
        name = f"teacher-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        shared = Path(settings.cache_dir) if settings.cache_dir else None
        if shared is not None and (shared / f"{name}.onnx").is_file() and not (folder / f"{name}.onnx").is_file():
            _copy_teacher(shared, folder, name)
        shape, classes = self.data.input_shape, self.data.num_classes
        path = shared_teacher(
            lambda: self.space.build(candidate, shape, classes), self.data, cache_dir=folder, key=key,
            epochs=settings.teacher_epochs, seed=self.seed, fit_kwargs={**fit, "compute_slot": False}, progress=progress,
            settings=recipe,
            opset=self.opset,
        )
        if shared is not None and not (shared / f"{name}.onnx").is_file():
            _copy_teacher(folder, shared, name)
        record = json.loads(path.with_suffix(".json").read_text())  # shared_teacher's, beside the file
        return path, {"key": key, "candidate": candidate, "epochs": settings.teacher_epochs,
                      "val_accuracy": record.get("val_accuracy")}

    def _distill_values(self, candidate: dict[str, Any]) -> dict[str, float]:
        """temperature and weight: the candidate's distill.* over compression.distill's."""
        return {"temperature": self.compression.temperature, "weight": self.compression.weight,
                **distill_values(candidate)}

    def distillation(self, candidate: dict[str, Any]) -> Distillation | None:
        """How the candidate learns from the teacher: its distill.* values over compression.distill's."""
        if self.compression.teacher is None:
            return None
        if self.teacher is None:
            raise RuntimeError("compression.distill.teacher: train, but the teacher was not prepared "
                               "(PipelineEvaluator.prepare_teacher runs before any trial)")
        from hwnas.evaluators.distill import Distillation

        values = self._distill_values(candidate)
        if values["weight"] == 0:  # the teacher's share is nil: the same training without running it per batch
            return None
        return Distillation(teacher=self.teacher, temperature=values["temperature"], weight=values["weight"])

    def evaluate_file(self, path: str | Path, split: str) -> float:
        """ORT accuracy of any ONNX file on the 'val' or 'test' split of this evaluator's data.

        The file may come from elsewhere (hwnas-export reads a run folder): it is loaded as a checked,
        self-contained model (evaluators.onnx_check; OnnxFileError naming the file otherwise)."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"split={split!r} is not an evaluation split; allowed: {', '.join(EVAL_SPLITS)}")
        from hwnas.evaluators.onnx_check import load_checked

        model = load_checked(path)
        x, y = self.data.arrays(split)
        return onnx_accuracy(model, x, y)

    def trial_seed(self, candidate: dict[str, Any]) -> int:
        """Seed of one evaluation: from the run seed and the architecture, so every compression of one
        network starts from the same trained weights and re-evaluating a candidate repeats it exactly.
        The `train.*` knobs are left out too: candidates trained differently start from the same initial
        weights (common random numbers), so what differs between them is the training (net_id keeps
        them apart, as their trained weights differ)."""
        net = {k: v for k, v in candidate.items() if not is_train_key(k)}
        return (self.seed * 1_000_003 + int(net_id(net), 16)) % (2**31 - 1)

    def training_settings(self, candidate: dict[str, Any]) -> dict[str, Any]:
        """How the candidate is trained: its `train.*` values (spaces/training.py) over this evaluator's
        defaults: epochs, lr, optimizer, weight_decay, momentum (SGD), label_smoothing and batch_size
        (None: the data's own). One-line ValueError on a bad `train.*` value."""
        from hwnas.evaluators.training_options import DEFAULT_MOMENTUM

        defaults = {
            "epochs": self.epochs, "lr": self.lr, "optimizer": self.optimizer, "weight_decay": self.weight_decay,
            "momentum": DEFAULT_MOMENTUM, "label_smoothing": 0.0, "batch_size": None,
        }
        out = {**defaults, **training_values(candidate)}
        if self.compression.teacher is not None:  # how the teacher's soft targets weigh in (card: training)
            out["distill"] = {**self._distill_values(candidate), "teacher_sha256": (self.teacher_info or {}).get("sha256")}
        if self.compression.qat_epochs and candidate.get("quant") == "int8":
            out["qat"] = {"epochs": self.compression.qat_epochs,
                          "lr": out["lr"] * self.compression.qat_lr_scale}
        return out

    # The runners pass the sweep's reporter (search/schedulers/) to this evaluator.
    reports_epochs = True

    def evaluate(
        self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None, report: Reporter | None = None
    ) -> Evaluation:
        """`deadline` (time.monotonic() value): past it the evaluation stops with TimeoutError,
        checked between steps and after every training batch. `report`: the scheduler's reporter; the
        untrained file is timed first and reported (epoch 0), then each rung epoch; TrialStopped when it says stop."""
        prune_ratio, fmt = self._compression(candidate)
        self.training_settings(candidate)  # a bad train.* value fails the trial before any work
        with self._running(deadline):
            return self._evaluate(candidate, Path(trial_dir), prune_ratio, fmt, report)

    def retrain(
        self, candidate: dict[str, Any], out_dir: Path, epochs: int, deadline: float | None = None
    ) -> Evaluation:
        """Final training: the candidate trained from scratch for `epochs` on train + val ("trainval"),
        seeded with trial_seed(candidate), compressed as in the sweep (pruning with fine-tuning on
        trainval, calibration from trainval) into out_dir/model.onnx, the fp32 twin beside it as
        model_fp32.onnx when the format is not fp32. No latency: measure_fresh times the file.

        Metrics: test_accuracy, float_test_accuracy, val_accuracy and float_val_accuracy (in-sample
        now: val was trained on), torch_val_accuracy, params, macs, model_bytes and the step times."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs: {epochs!r} is not allowed; allowed: an int >= 1")
        prune_ratio, fmt = self._compression(candidate)
        self.training_settings(candidate)  # the candidate's train.* values, checked; epochs stays the argument
        out_dir = Path(out_dir)
        with self._running(deadline):
            start = time.perf_counter()
            metrics: dict[str, float] = {}
            made = self._make_files(candidate, out_dir, prune_ratio, fmt, metrics, split=FINAL_SPLIT, epochs=epochs)
            with _timed(metrics, "accuracy"), self._check_deadline("accuracy"):
                for split in EVAL_SPLITS:
                    x, y = self.data.arrays(split)
                    for prefix, score in made.scores(x, y).items():
                        metrics[f"{prefix}{split}_accuracy"] = score
                made.drop_ptq()
            metrics["total_s"] = time.perf_counter() - start
            metrics["data_load_s"] = made.data_load_s
        metrics.update(made.metrics())
        sizes = self.data.summary().get("splits", {})
        info = {
            **made.info(fmt, prune_ratio),
            "split": FINAL_SPLIT,
            "train_items": int(sizes.get("train", 0)) + int(sizes.get("val", 0)),
            "epochs": epochs,
            "training": {**self.training_settings(candidate), "epochs": epochs},
            "finetune_epochs": self.finetune_epochs if prune_ratio > 0 or made.factorized else 0,
            "float_artifact": str(made.twin) if made.twin is not None else None,
            "opset": self.opset,
            "torch_threads": self.torch_threads,
        }
        return Evaluation(metrics=metrics, artifact=str(made.artifact), info=info)

    def measure_fresh(self, path: str | Path, *, latency_file: Path | None = None) -> dict[str, Any]:
        """A latency of `path` taken now on the sweep's target with its protocol, for the export: the
        cache is neither read nor written, and no predictor is asked unless the plan only predicts
        (then the prediction, source "predicted", with its error under "prediction_error").

        Returns Measurement.to_dict() (median_ms, p90_ms, cv, n_runs, disturbed, device_id, source,
        protocol, fingerprint, ...), plus "prediction_error" when predicted: {low_ms, high_ms (the
        interval), mape, within10, spearman, n_fit, outside_range}. `latency_file`: where to also write it
        as a latency.json record (nothing is written otherwise; a trial's own latency.json is never touched)."""
        m, prediction = self.latency.measure_fresh(Path(path))
        out = m.to_dict()
        if prediction is not None:
            out["prediction_error"] = {key: prediction[key] for key in PREDICTION_ERROR_KEYS}
        if latency_file is not None:
            record = {"measurement": m.to_dict(), "prediction": prediction}
            Path(latency_file).write_text(json.dumps(record, indent=1, default=float))
        return out

    def _evaluate(
        self, candidate: dict[str, Any], trial_dir: Path, prune_ratio: float, fmt: str, report: Reporter | None = None
    ) -> Evaluation:
        # total_s covers every step of the evaluation, so that sweep overheads (process start-up,
        # scheduling, bookkeeping) are what is left of the wall time, not work a trial did unclocked.
        start = time.perf_counter()
        metrics: dict[str, float] = {"early_s": 0.0}
        epochs = self.training_settings(candidate)["epochs"]  # train.epochs over evaluator.epochs
        made = self._make_files(candidate, trial_dir, prune_ratio, fmt, metrics, split="train", epochs=epochs,
                                report=report)
        artifact = made.artifact
        with _timed(metrics, "accuracy"), self._check_deadline("accuracy"):
            x_val, y_val = self.data.arrays("val")
            # The fp32 twin's accuracy: what compression cost (fp32 is its own twin, not scored twice); with
            # QAT also the PTQ file's: what quantization-aware training won back.
            scores = made.scores(x_val, y_val)
            val_accuracy, float_val_accuracy = scores[""], scores["float_"]
            if "ptq_" in scores:
                metrics["ptq_val_accuracy"] = scores["ptq_"]
            made.drop_ptq()
        with _timed(metrics, "latency"), self._deadline_only("latency"):
            stats, how = self._final_latency(made, candidate)
        metrics["total_s"] = time.perf_counter() - start
        # Reading and normalising batches (training, fine-tuning): with `data_s`, the trial's data cost.
        metrics["data_load_s"] = made.data_load_s

        metrics.update(
            val_accuracy=val_accuracy, float_val_accuracy=float_val_accuracy, train_epochs=float(epochs),
            **_latency_metrics(stats, how), **made.metrics(),
        )
        info = {
            **made.info(fmt, prune_ratio),
            "latency_target": self.latency.target.name,
            "latency_source": stats.source,
            "device_id": stats.device_id,
            "latency_runs": stats.n_runs,
            "training": self.training_settings(candidate),
            "opset": self.opset,
            "torch_threads": self.torch_threads,
        }
        return Evaluation(metrics=metrics, artifact=str(artifact), info=info)

    def _make_files(
        self, candidate: dict[str, Any], out_dir: Path, prune_ratio: float, fmt: str, metrics: dict[str, float],
        *, split: str, epochs: int, report: Reporter | None = None,
    ) -> _Made:
        """The steps a trial and final training share: data -> build -> [early] -> train on `split` -> factorize ->
        prune -> fine-tune -> profile -> export (fp32) -> compress. Clocks each step into `metrics`; leaves
        out_dir/model.onnx and, when compressed, its fp32 twin out_dir/model_fp32.onnx. With `report`, the
        untrained file is made and timed first (model_early.onnx) and reported, and so is each rung epoch:
        TrialStopped when the scheduler stops the trial."""
        with self._computing():
            import pytorch_lightning as pl
            import torch

            from hwnas.evaluators.onnx_export import export_onnx
            from hwnas.evaluators.profile import count_params_macs
            from hwnas.evaluators.prune import prune

        out_dir.mkdir(parents=True, exist_ok=True)
        seed = self.trial_seed(candidate)
        dm = self.data
        with _timed(metrics, "data"), self._computing():
            # Opens the cache the driver decoded (memory-mapped): no trial decodes or splits again.
            dm.setup()
            input_shape, num_classes = dm.input_shape, dm.num_classes
            x_val, y_val = dm.arrays("val")
            example = torch.from_numpy(dm.sample(split, 1, seed))
        loaded_before = getattr(dm, "load_seconds", 0.0)

        check = self._check_deadline
        with _timed(metrics, "build"), self._computing():
            pl.seed_everything(seed, verbose=False)
            model = self.space.build(candidate, input_shape, num_classes)
            if self.init_from is not None:  # pretrained weights where they fit (init_weights.py)
                from hwnas.evaluators.init_weights import load_init

                metrics.update(load_init(model, self.init_from, strict=self.init_strict))
        calibration = dm.sample(split, self.calibration_samples, seed)
        ranks = getattr(self.space, "low_rank", lambda _c: {})(candidate)
        early, hook, stopped = None, None, []
        if report is not None:
            with _timed(metrics, "early"):
                early = self._early(model, candidate, out_dir, prune_ratio, fmt, example, calibration)
            # epochs: what the trial would train in full (the driver counts the epochs stopping saved); the step
            # times so far: what a rejected or stopped trial cost (its record has no other)
            spent = {k: v for k, v in metrics.items() if k.endswith("_s")}
            if not report(0, {**early.metrics, **spent, "train_epochs_full": float(epochs)}):
                raise TrialStopped(0)
            rungs = {r for r in report.rungs if r < epochs}
            if rungs:
                hook = self._rung_hook(report, rungs, early, candidate, prune_ratio, example, split, seed, epochs,
                                       stopped, spent)
        # Training holds the compute slot per batch (evaluators/train.py), not for the whole fit.
        with _timed(metrics, "train"), self._deadline_only("train"):
            steps: list[int] = []
            model = self._fit(model, epochs, seed, split, candidate, steps, on_epoch_end=hook)
        if stopped:
            raise TrialStopped(stopped[0])
        # Skipped steps report 0 s so that every trial has the same metric columns.
        metrics["prune_s"] = metrics["finetune_s"] = metrics["factorize_s"] = metrics["qat_s"] = 0.0
        # Low-rank factorization of the trained layers (the space's stage<k>.rank_ratio), before pruning:
        # pruning then also thins the rank of each factorized pair; one fine-tuning recovers from both.
        factorized = 0
        if ranks:
            with _timed(metrics, "factorize"), check("factorize"):
                from hwnas.evaluators.lowrank import factorize

                model, factorized = factorize(model, ranks)
            metrics["lowrank_layers"] = float(factorized)
        if prune_ratio > 0:
            with _timed(metrics, "prune"), check("prune"):
                model = prune(model, prune_ratio, example)
        if (prune_ratio > 0 or factorized) and self.finetune_epochs > 0:
            with _timed(metrics, "finetune"), self._deadline_only("finetune"):
                model = self._fit(model, self.finetune_epochs, seed + 1, split, candidate)
        with _timed(metrics, "profile"), self._computing():
            model = model.cpu().eval()
            params, macs = count_params_macs(model, example)
            torch_val_accuracy = _torch_accuracy(model, x_val, y_val)

        artifact = out_dir / ARTIFACT_NAME
        twin = out_dir / FLOAT_ARTIFACT_NAME
        with _timed(metrics, "export"), check("export"):
            export_onnx(model, example, twin, opset=self.opset)
        with _timed(metrics, "compress"), check("compress"):
            self._compress(twin, fmt, calibration, artifact, candidate)
            if fmt == "fp32":
                # fp32 is its own twin: one file, the artifact measured and shipped.
                twin.unlink()
        ptq = None
        if fmt == "int8" and self.compression.qat_epochs > 0:
            ptq = self._quantization_aware(model, candidate, out_dir, example, calibration, metrics, seed, split)
        return _Made(
            artifact=artifact, twin=None if fmt == "fp32" else twin, seed=seed, input_shape=input_shape,
            num_classes=num_classes, params=params, macs=macs, torch_val_accuracy=float(torch_val_accuracy),
            data_load_s=getattr(dm, "load_seconds", 0.0) - loaded_before, train_steps=sum(steps),
            factorized=factorized, ptq=ptq, early=early,
        )

    def _early(
        self, model: nn.Module, candidate: dict[str, Any], out_dir: Path, prune_ratio: float, fmt: str, example: Any,
        calibration: np.ndarray,
    ) -> _Early:
        """The candidate's compressed file made from its untrained weights (factorized, pruned, exported, compressed
        as the trained one will be) and timed: out_dir/model_early.onnx. Pruning keeps a fixed share of each layer
        group's channels and the rank knob a fixed rank, so the trained file has this graph too (checked when it
        is made: `_final_latency`)."""
        import copy

        from hwnas.evaluators.onnx_export import export_onnx
        from hwnas.evaluators.profile import count_params_macs

        early, twin = out_dir / "model_early.onnx", out_dir / "model_early_fp32.onnx"
        with self._check_deadline("early"):
            net = self._compressed_network(_distinct_constants(copy.deepcopy(model)), candidate, prune_ratio, example)
            params, macs = count_params_macs(net, example)
            export_onnx(net, example, twin, opset=self.opset)
            self._compress(twin, fmt, calibration, early, candidate)
            twin.unlink()
        with self._deadline_only("latency"):
            stats, how = self.latency.measure(
                early, arch=self._arch_name(candidate), candidate=candidate, space=type(self.space).__name__
            )
        metrics = {**_latency_metrics(stats, how), "model_bytes": float(early.stat().st_size),
                   "params": float(params), "macs": float(macs)}
        return _Early(path=early, stats=stats, how=how, metrics=metrics)

    def _compressed_network(self, net: nn.Module, candidate: dict[str, Any], prune_ratio: float, example: Any) -> nn.Module:
        """`net` factorized and pruned as the candidate says (no fine-tuning), on CPU in eval mode."""
        from hwnas.evaluators.prune import prune

        ranks = getattr(self.space, "low_rank", lambda _c: {})(candidate)
        if ranks:
            from hwnas.evaluators.lowrank import factorize

            net, _ = factorize(net, ranks)
        net = net.cpu().eval()
        return prune(net, prune_ratio, example) if prune_ratio > 0 else net

    def _rung_hook(
        self, report: Reporter, rungs: set[int], early: _Early, candidate: dict[str, Any], prune_ratio: float,
        example: Any, split: str, seed: int, epochs: int, stopped: list[int], spent: dict[str, float],
    ) -> Any:
        """The training callback of a scheduled trial: at each rung epoch, the cheap accuracy (_rung_accuracy) and
        the early file's figures go to the scheduler, with the seconds spent (`spent` before training, train_s
        since it began); False stops training (the epoch is put in `stopped`)."""
        began = time.perf_counter()  # made just before the fit

        def hook(epoch: int, net: nn.Module) -> bool:
            if epoch not in rungs:
                return True
            accuracy = self._rung_accuracy(net, candidate, prune_ratio, example, split, seed)
            keep = bool(report(epoch, {**early.metrics, **spent, "train_s": time.perf_counter() - began,
                                       "rung_val_accuracy": accuracy, "train_epochs_full": float(epochs)}))
            if not keep:
                stopped.append(epoch)
            return keep

        return hook

    def _rung_accuracy(
        self, net: nn.Module, candidate: dict[str, Any], prune_ratio: float, example: Any, split: str, seed: int,
        bn_samples: int = 512,
    ) -> float:
        """What a rung ranks by: the val accuracy (torch) of a copy of the network trained so far, factorized and
        pruned as the candidate says, its BatchNorm statistics re-estimated on `bn_samples` training images
        ("adaptive BN", EagleEye, Li et al. 2020: it ranks pruned sub-networks close to their fine-tuned accuracy
        without fine-tuning). Not quantized (int8 costs this space well under a point; its latency is exact).
        Seconds, not epochs: the rung costs no fine-tuning. The global RNG state is kept, so training goes on
        exactly as it would have."""
        import copy

        import torch

        state = torch.random.get_rng_state()
        try:
            with self._computing():
                copied = copy.deepcopy(net).cpu()
                copied = self._compressed_network(copied.eval(), candidate, prune_ratio, example)
                norms = [m for m in copied.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None  # a cumulative average over the re-estimation batches
                    m.train()
                images = self.data.sample(split, bn_samples, seed + 3)
                with torch.no_grad():
                    for start in range(0, len(images), 64):
                        copied(torch.from_numpy(images[start : start + 64]))
                x_val, y_val = self.data.arrays("val")
                return _torch_accuracy(copied, x_val, y_val)
        finally:
            torch.random.set_rng_state(state)

    def _final_latency(self, made: _Made, candidate: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        """The trained file's latency. After an early measurement: when the trained file has the early file's
        graph (evaluators/graph_signature.py), that measurement is its latency (latency_early 1); otherwise the
        early figure was an estimate: the trained file is timed too, and how far apart they were is reported."""
        measure = lambda path: self.latency.measure(  # noqa: E731
            path, arch=self._arch_name(candidate), candidate=candidate, space=type(self.space).__name__
        )
        early = made.early
        if early is None:
            return measure(made.artifact)
        from hwnas.evaluators.graph_signature import graph_signature

        if graph_signature(made.artifact) == graph_signature(early.path):
            early.path.unlink()
            return early.stats, {**early.how, "latency_early": 1.0}
        stats, how = measure(made.artifact)
        gap = 100.0 * (early.stats.median_ms - stats.median_ms) / stats.median_ms
        return stats, {**how, "latency_early": 0.0, "latency_early_ms": early.stats.median_ms, "latency_early_gap_pct": gap}

    def _compress(
        self, source: Path, fmt: str, calibration: np.ndarray, out: Path, candidate: dict[str, Any]
    ) -> None:
        """`source` (fp32 ONNX) compressed to `fmt` for this sweep's target at `out` (evaluators/quantize.py)."""
        from hwnas.evaluators.quantize import compress_onnx

        compress_onnx(
            source, fmt, calibration, out,
            int8_full_range=self.latency.int8_full_range, provider=self.latency.target.provider,
            fingerprint=self.latency.fingerprint() or None,
            # Per-stage precision (space.stage_precision): the stages that stay float in an int8 file.
            keep_float=self._float_modules(candidate),
            pin_first_last=self.compression.pin_first_last,
        )

    def _float_modules(self, candidate: dict[str, Any]) -> list[str]:
        return list(getattr(self.space, "float_modules", lambda _c: [])(candidate))

    def _quantization_aware(
        self, model: nn.Module, candidate: dict[str, Any], out_dir: Path, example: Any, calibration: np.ndarray,
        metrics: dict[str, float], seed: int, split: str,
    ) -> Path:
        """QAT (compression.qat_epochs): fine-tune `model` fake-quantized on the grids ORT's int8 file uses
        (evaluators/qat.py), then quantize the result like any int8 file: same graph, same kernels, so the
        latency is a PTQ file's and only the weights differ. The PTQ file already at out_dir/model.onnx
        moves to model_ptq.onnx (returned; scored, then removed) and the QAT file takes its place."""
        from hwnas.evaluators.onnx_export import export_onnx
        from hwnas.evaluators.qat import prepare_qat, strip_qat

        artifact, ptq = out_dir / ARTIFACT_NAME, out_dir / "model_ptq.onnx"
        with _timed(metrics, "qat"), self._deadline_only("qat"):
            artifact.replace(ptq)
            fake = prepare_qat(model, keep_float=self._float_modules(candidate), full_range=self.latency.int8_full_range,
                               pin_first_last=self.compression.pin_first_last)
            fake = self._fit(fake, self.compression.qat_epochs, seed + 2, split, candidate,
                             lr_scale=self.compression.qat_lr_scale)
            trained = out_dir / "model_qat_fp32.onnx"
            with self._computing():
                export_onnx(strip_qat(fake), example, trained, opset=self.opset)
                self._compress(trained, "int8", calibration, artifact, candidate)  # the PTQ file's calibration
            trained.unlink()
        return ptq

    # -- helpers --------------------------------------------------------------------------------
    def _arch_name(self, candidate: dict[str, Any]) -> str:
        # The space's readable name (NB201 arch string, macro `conv16k3d2-...`) + the compression: the
        # cache's "architecture encoding", readable by hwnas-predictor.
        from hwnas.spaces.candidate import canonical

        name = getattr(self.space, "name", None)
        return name(candidate) if callable(name) else canonical(candidate)

    @contextmanager
    def _deadline_only(self, step: str) -> Iterator[None]:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise TimeoutError(f"trial ran past its time limit before {step}")
        yield

    @staticmethod
    def _compression(candidate: dict[str, Any]) -> tuple[float, str]:
        # A space whose compression is fixed leaves the keys out (NB201 by default): no pruning, fp32.
        ratio, fmt = float(candidate.get("prune_ratio", 0.0)), candidate.get("quant", "fp32")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"prune_ratio={ratio!r} is out of range; allowed: 0 <= prune_ratio < 1")
        if fmt not in FORMATS:
            raise ValueError(f"quant={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
        return ratio, fmt

    @contextmanager
    def _check_deadline(self, step: str) -> Iterator[None]:
        """The deadline check, then the step under the node's compute slot."""
        with self._deadline_only(step), self._computing():
            yield

    def _computing(self) -> AbstractContextManager[None]:
        """The node's compute slot while a step computes, when latency is timed on this node: no
        measurement runs while a trial computes on the same cores (training holds it per batch)."""
        if not self.latency.isolates_host:
            return nullcontext()
        from hwnas.evaluators.measure.lock import compute_slot

        return compute_slot()

    @contextmanager
    def _running(self, deadline: float | None) -> Iterator[None]:
        """One evaluation's settings: its deadline and torch's thread count, restored afterwards."""
        with self._computing():  # a worker's first import of torch is seconds of CPU: not beside a timing
            import torch

        self._deadline = deadline
        previous = torch.get_num_threads()
        # Small CNNs gain nothing from more CPU threads, and with concurrent trials on few cores
        # OpenMP threads oversubscribe and spin: measured 0.09 s vs 5 s per fit on 2 busy cores.
        torch.set_num_threads(self.torch_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _fit(
        self, model: nn.Module, epochs: int, seed: int, split: str = "train", candidate: dict[str, Any] | None = None,
        steps: list[int] | None = None, lr_scale: float = 1.0, on_epoch_end: Any = None,
    ) -> nn.Module:
        """Train for `epochs` with the candidate's training settings (training_settings) but its epochs, the
        learning rate times `lr_scale` (QAT's), learning from the teacher when there is one; the optimizer
        steps taken are appended to `steps` when given."""
        from hwnas.evaluators.train import fit

        settings = self.training_settings(candidate or {})
        return fit(
            model,
            self.data,
            epochs=epochs,
            lr=settings["lr"] * lr_scale,
            distill=self.distillation(candidate or {}),
            optimizer=settings["optimizer"],
            weight_decay=settings["weight_decay"],
            label_smoothing=settings["label_smoothing"],
            momentum=settings["momentum"],
            batch_size=settings["batch_size"],
            steps=steps,
            accelerator=self.accelerator,
            seed=seed,
            deadline=self._deadline,
            compute_slot=self.latency.isolates_host,
            split=split,
            on_epoch_end=on_epoch_end,
        )
