"""Train any classifier nn.Module with PyTorch Lightning, quietly and reproducibly."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from hwnas.evaluators.data import DataRecipe
from hwnas.evaluators.data.base import FIT_SPLITS
from hwnas.evaluators.training_options import DEFAULT_MOMENTUM, check_accelerator

if TYPE_CHECKING:
    from hwnas.evaluators.distill import Distillation


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a wrapped network (with `label_smoothing`); cosine LR schedule over
    `epochs`; SGD is Nesterov with `momentum`. With `distill` (evaluators.distill.Distillation), the loss
    is `distillation_loss` against the teacher's logits for exactly the batch the student sees (after
    augmentation)."""

    def __init__(
        self, model: nn.Module, *, lr: float, optimizer: str, weight_decay: float, epochs: int,
        label_smoothing: float = 0.0, momentum: float = DEFAULT_MOMENTUM, distill: Distillation | None = None,
    ) -> None:
        super().__init__()
        # The settings were checked once, by PipelineEvaluator's constructor, before any trial.
        self.model = model
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.label_smoothing = label_smoothing
        self.momentum = momentum
        self.distill = distill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.distill is None:
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        else:
            from hwnas.evaluators.distill import distillation_loss

            loss = distillation_loss(
                self.model(x), self.distill.teacher.logits(x), y, temperature=self.distill.temperature,
                weight=self.distill.weight, label_smoothing=self.label_smoothing,
            )
        # Fail loudly: a diverged candidate must be recorded as failed, not scored on garbage weights.
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} in epoch {self.current_epoch}")
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.model.parameters()
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                nesterov=self.momentum > 0,
            )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class SplitsDataModule(pl.LightningDataModule):
    """The Lightning face of a dataset's fixed splits (`evaluators.data.DataRecipe`); `seed` orders and
    augments the training batches (the trial's seed, so a re-evaluated candidate sees the same batches).
    `split`: what it trains on, "train" in a sweep, "trainval" (train + val) in final training.
    `batch_size`: the training batches' size over the data's own (a candidate's `train.batch_size`)."""

    def __init__(self, data: DataRecipe, seed: int, split: str = "train", batch_size: int | None = None) -> None:
        super().__init__()
        self.data = data
        self.seed = seed
        self.split = split
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        self.data.setup()  # idempotent: opens the memory-mapped cache once per process

    def train_dataloader(self) -> DataLoader:
        loader = self.data.loader(self.split, shuffle=True, seed=self.seed)
        return loader if self.batch_size is None else rebatched(loader, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.data.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.data.loader("test", shuffle=False)


def rebatched(loader: DataLoader, batch_size: int) -> DataLoader:
    """The same items in the same (seeded) order, in batches of `batch_size`: a recipe's loader (a
    BatchSampler as its sampler, whole batches read at once) or a plain batching DataLoader."""
    if isinstance(loader.sampler, BatchSampler) and loader.batch_size is None:  # evaluators/data/recipe.py
        sampler = BatchSampler(loader.sampler.sampler, batch_size, drop_last=loader.sampler.drop_last)
        return DataLoader(loader.dataset, sampler=sampler, batch_size=None, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn)
    if isinstance(loader.batch_sampler, BatchSampler):
        sampler = BatchSampler(loader.batch_sampler.sampler, batch_size, drop_last=loader.batch_sampler.drop_last)
        return DataLoader(loader.dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn)
    raise ValueError(f"train.batch_size: the data's loader ({type(loader.sampler).__name__}) cannot be rebatched; "
                     "allowed: a DataLoader batching with a BatchSampler")


class _Deadline(pl.Callback):
    """Stop training past a wall-clock deadline (time.monotonic()): a trial's time limit."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"trial ran past its time limit in training epoch {trainer.current_epoch}")


class _EpochHook(pl.Callback):
    """After each training epoch, `hook(epochs done, network)`; False stops training there (a scheduler's rung)."""

    def __init__(self, hook: Callable[[int, nn.Module], bool]) -> None:
        self.hook = hook

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self.hook(trainer.current_epoch + 1, module.model):
            trainer.should_stop = True


class ComputeSlot(pl.Callback):
    """Hold the node's compute slot (evaluators.measure.lock) for each training batch, released between
    batches: a latency measurement on this node waits for at most one batch, and no batch runs while it times."""

    def __init__(self) -> None:
        self._held: AbstractContextManager[None] | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        from hwnas.evaluators.measure.lock import compute_slot

        self._release()  # a batch whose end hook never ran (Lightning skips it on some exits)
        self._held = compute_slot()
        self._held.__enter__()

    def on_train_batch_end(self, *args: Any) -> None:
        self._release()

    def on_exception(self, *args: Any, **kwargs: Any) -> None:
        self._release()

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)


def _quiet_lightning() -> None:
    # Lightning prints "GPU available: ..." etc. at INFO for every Trainer; one per trial is noise.
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit(
    model: nn.Module,
    data: DataRecipe,
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    accelerator: str,
    seed: int,
    deadline: float | None = None,
    compute_slot: bool = True,
    split: str = "train",
    label_smoothing: float = 0.0,
    momentum: float = DEFAULT_MOMENTUM,
    batch_size: int | None = None,
    steps: list[int] | None = None,
    distill: Distillation | None = None,
    on_epoch_end: Callable[[int, nn.Module], bool] | None = None,
) -> nn.Module:
    """Train `model` in place for `epochs` on the data's `split` ("train", or "trainval" for final
    training); return it on CPU in eval mode.
    label_smoothing, momentum (SGD only): the loss's and optimizer's; batch_size: training batches of
    that size instead of the data's own (None). steps: when a list, the optimizer steps taken are
    appended to it (Lightning's trainer.global_step), for callers that report them.
    compute_slot: hold the node's compute slot per batch (ComputeSlot); False where no latency is timed
    on this node (remote or predicted targets). distill: train against a teacher's logits
    (evaluators.distill.Distillation; the teacher is checked against the data's shapes first); None:
    plain cross-entropy. on_epoch_end(epochs done, network): after every epoch, with the learning-rate
    schedule of all `epochs` running on; False ends training there (the scheduler stopped the trial)."""
    check_accelerator(accelerator)
    if split not in FIT_SPLITS:
        raise ValueError(f"split={split!r} is not a training split; allowed: {', '.join(FIT_SPLITS)}")
    if distill is not None:
        distill.teacher.check_fits(data.input_shape, data.num_classes)
    _quiet_lightning()
    pl.seed_everything(seed, workers=True, verbose=False)
    module = ClassifierModule(model, lr=lr, optimizer=optimizer, weight_decay=weight_decay, epochs=epochs,
                              label_smoothing=label_smoothing, momentum=momentum, distill=distill)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if accelerator == "cuda" else accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*([ComputeSlot()] if compute_slot else []), *([_Deadline(deadline)] if deadline is not None else []),
                   *([_EpochHook(on_epoch_end)] if on_epoch_end is not None else [])],
    )
    # Lightning keeps each submodule's train/eval flag as given; a previously fitted model is in eval mode.
    model.train()
    with warnings.catch_warnings():
        # Tiny in-memory loaders with num_workers=0 are deliberate; Lightning's advice does not apply.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # Lightning's own use of a deprecated torch API; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        # No validation loop (ClassifierModule has no validation_step, so Lightning skips the data
        # module's val loader and says so): accuracy is measured on the exported file with ONNX Runtime.
        warnings.filterwarnings("ignore", message=".*no `validation_step`.*")
        trainer.fit(module, datamodule=SplitsDataModule(data, seed, split, batch_size))
    if steps is not None:
        steps.append(int(trainer.global_step))
    return module.model.cpu().eval()
