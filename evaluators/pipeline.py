"""One trial end to end: build -> train -> prune -> fine-tune -> export -> compress -> ORT accuracy -> latency.

The reported accuracy and latency are both measured on the single compressed ONNX file left in the
trial directory, so what the search ranks is exactly what would be deployed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.evaluators.base import Evaluation
from hwnas.evaluators.data import DataRecipe
from hwnas.evaluators.measure.base import Target
from hwnas.evaluators.measure.plan import LatencyPlan
from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.evaluators.training_options import OPTIMIZERS, check_accelerator
from hwnas.spaces.base import SearchSpace
from hwnas.spaces.candidate import FORMATS, net_id

if TYPE_CHECKING:
    from torch import nn

# The driver builds, validates and pickles this evaluator; only workers run it. So torch, Lightning,
# Torch-Pruning and ONNX quantization are imported where a trial runs, not on import: the driver
# starts Ray ~9 s sooner (2 cores), and a tabular sweep never loads them at all.

ARTIFACT_NAME = "model.onnx"
STEPS = ("data", "build", "train", "prune", "finetune", "profile", "export", "compress", "accuracy", "latency")
EVAL_SPLITS = ("val", "test")
METRIC_NAMES = frozenset(
    {
        "val_accuracy",
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
        "energy_j",  # joules per inference, only where the target has a meter (RAPL, NVML)
        "model_bytes",
        "params",
        "macs",
        "total_s",
        "data_load_s",
        *(f"{step}_s" for step in STEPS),
    }
)


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
        self._deadline: float | None = None

    # -- public API -----------------------------------------------------------------------------
    @property
    def metric_names(self) -> frozenset[str]:
        """Every metric `evaluate` reports, so the experiment can check objectives before any trial."""
        return METRIC_NAMES

    def warm_up(self) -> None:
        """Make the data splits now (scikit-learn and all), so that the export at the end does not wait."""
        self.data.setup()

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
        network starts from the same trained weights and re-evaluating a candidate repeats it exactly."""
        return (self.seed * 1_000_003 + int(net_id(candidate), 16)) % (2**31 - 1)

    def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Evaluation:
        """`deadline` (time.monotonic() value): past it the evaluation stops with TimeoutError,
        checked between steps and after every training batch."""
        with self._computing():  # a worker's first import of torch is seconds of CPU: not beside a timing
            import torch

        prune_ratio, fmt = self._compression(candidate)
        self._deadline = deadline
        previous = torch.get_num_threads()
        # Small CNNs gain nothing from more CPU threads, and with concurrent trials on few cores
        # OpenMP threads oversubscribe and spin: measured 0.09 s vs 5 s per fit on 2 busy cores.
        torch.set_num_threads(self.torch_threads)
        try:
            return self._evaluate(candidate, Path(trial_dir), prune_ratio, fmt)
        finally:
            torch.set_num_threads(previous)

    def _evaluate(
        self, candidate: dict[str, Any], trial_dir: Path, prune_ratio: float, fmt: str
    ) -> Evaluation:
        with self._computing():
            import pytorch_lightning as pl
            import torch

            from hwnas.evaluators.onnx_export import export_onnx
            from hwnas.evaluators.profile import count_params_macs
            from hwnas.evaluators.prune import prune
            from hwnas.evaluators.quantize import compress_onnx

        # total_s covers every step of the evaluation, so that sweep overheads (process start-up,
        # scheduling, bookkeeping) are what is left of the wall time, not work a trial did unclocked.
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        trial_dir.mkdir(parents=True, exist_ok=True)
        seed = self.trial_seed(candidate)
        dm = self.data
        with _timed(metrics, "data"), self._computing():
            # Opens the cache the driver decoded (memory-mapped): no trial decodes or splits again.
            dm.setup()
            input_shape, num_classes = dm.input_shape, dm.num_classes
            x_val, y_val = dm.arrays("val")
            example = torch.from_numpy(dm.sample("train", 1, seed))
        loaded_before = getattr(dm, "load_seconds", 0.0)

        check = self._check_deadline
        with _timed(metrics, "build"), self._computing():
            pl.seed_everything(seed, verbose=False)
            model = self.space.build(candidate, input_shape, num_classes)
        # Training holds the compute slot per batch (evaluators/train.py), not for the whole fit.
        with _timed(metrics, "train"), self._deadline_only("train"):
            model = self._fit(model, self.epochs, seed)
        # Skipped steps report 0 s so that every trial has the same metric columns.
        metrics["prune_s"] = metrics["finetune_s"] = 0.0
        if prune_ratio > 0:
            with _timed(metrics, "prune"), check("prune"):
                model = prune(model, prune_ratio, example)
            if self.finetune_epochs > 0:
                with _timed(metrics, "finetune"), self._deadline_only("finetune"):
                    model = self._fit(model, self.finetune_epochs, seed + 1)
        with _timed(metrics, "profile"), self._computing():
            model = model.cpu().eval()
            params, macs = count_params_macs(model, example)
            torch_val_accuracy = _torch_accuracy(model, x_val, y_val)

        artifact = trial_dir / ARTIFACT_NAME
        fp32_path = trial_dir / "model_fp32.onnx"
        with _timed(metrics, "export"), check("export"):
            export_onnx(model, example, fp32_path, opset=self.opset)
        with _timed(metrics, "compress"), check("compress"):
            calibration = dm.sample("train", self.calibration_samples, seed)
            compress_onnx(
                fp32_path, fmt, calibration, artifact,
                int8_full_range=self.latency.int8_full_range, provider=self.latency.target.provider,
                fingerprint=self.latency.fingerprint() or None,
            )
            # One file per trial: the artifact is the exact file measured below.
            fp32_path.unlink()
        with _timed(metrics, "accuracy"), check("accuracy"):
            val_accuracy = onnx_accuracy(artifact, x_val, y_val)
        with _timed(metrics, "latency"), self._deadline_only("latency"):
            stats, how = self.latency.measure(
                artifact, arch=self._arch_name(candidate), candidate=candidate, space=type(self.space).__name__
            )
        metrics["total_s"] = time.perf_counter() - start
        # Reading and normalising batches (training, fine-tuning): with `data_s`, the trial's data cost.
        metrics["data_load_s"] = getattr(dm, "load_seconds", 0.0) - loaded_before

        metrics.update(
            val_accuracy=float(val_accuracy),
            torch_val_accuracy=float(torch_val_accuracy),
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
            model_bytes=float(artifact.stat().st_size),
            params=float(params),
            macs=float(macs),
        )
        info = {
            "seed": seed,
            "quant": fmt,
            "prune_ratio": prune_ratio,
            "input_shape": list(input_shape),
            "num_classes": num_classes,
            "latency_target": self.latency.target.name,
            "latency_source": stats.source,
            "device_id": stats.device_id,
            "latency_runs": stats.n_runs,
            "opset": self.opset,
            "torch_threads": self.torch_threads,
        }
        return Evaluation(metrics=metrics, artifact=str(artifact), info=info)

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

    def _fit(self, model: nn.Module, epochs: int, seed: int) -> nn.Module:
        from hwnas.evaluators.train import fit

        return fit(
            model,
            self.data,
            epochs=epochs,
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            accelerator=self.accelerator,
            seed=seed,
            deadline=self._deadline,
            compute_slot=self.latency.isolates_host,
        )
