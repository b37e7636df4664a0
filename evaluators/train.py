"""Train any classifier nn.Module with PyTorch Lightning, quietly and reproducibly."""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import AbstractContextManager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hwnas.evaluators.data import DataRecipe
from hwnas.evaluators.data.base import FIT_SPLITS
from hwnas.evaluators.training_options import check_accelerator


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a wrapped network; cosine LR schedule over `epochs`."""

    def __init__(
        self, model: nn.Module, *, lr: float, optimizer: str, weight_decay: float, epochs: int
    ) -> None:
        super().__init__()
        # The settings were checked once, by PipelineEvaluator's constructor, before any trial.
        self.model = model
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.epochs = epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
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
                params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, nesterov=True
            )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class SplitsDataModule(pl.LightningDataModule):
    """The Lightning face of a dataset's fixed splits (`evaluators.data.DataRecipe`); `seed` orders and
    augments the training batches (the trial's seed, so a re-evaluated candidate sees the same batches).
    `split`: what it trains on, "train" in a sweep, "trainval" (train + val) in final training."""

    def __init__(self, data: DataRecipe, seed: int, split: str = "train") -> None:
        super().__init__()
        self.data = data
        self.seed = seed
        self.split = split

    def setup(self, stage: str | None = None) -> None:
        self.data.setup()  # idempotent: opens the memory-mapped cache once per process

    def train_dataloader(self) -> DataLoader:
        return self.data.loader(self.split, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return self.data.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.data.loader("test", shuffle=False)


class _Deadline(pl.Callback):
    """Stop training past a wall-clock deadline (time.monotonic()): a trial's time limit."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"trial ran past its time limit in training epoch {trainer.current_epoch}")


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
) -> nn.Module:
    """Train `model` in place for `epochs` on the data's `split` ("train", or "trainval" for final
    training); return it on CPU in eval mode.
    compute_slot: hold the node's compute slot per batch (ComputeSlot); False where no latency is timed
    on this node (remote or predicted targets)."""
    check_accelerator(accelerator)
    if split not in FIT_SPLITS:
        raise ValueError(f"split={split!r} is not a training split; allowed: {', '.join(FIT_SPLITS)}")
    _quiet_lightning()
    pl.seed_everything(seed, workers=True, verbose=False)
    module = ClassifierModule(model, lr=lr, optimizer=optimizer, weight_decay=weight_decay, epochs=epochs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if accelerator == "cuda" else accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*([ComputeSlot()] if compute_slot else []), *([_Deadline(deadline)] if deadline is not None else [])],
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
        trainer.fit(module, datamodule=SplitsDataModule(data, seed, split))
    return module.model.cpu().eval()
