"""A researcher's own LightningDataModule, as a plug-in for the end-to-end data tests.

`hwnas dataset=lightning dataset.module._target_=own_datamodule.OwnDataModule plugins=[own_datamodule]`
(with tests/ on PYTHONPATH, for the driver and, through it, for the Ray workers).

The data is generated and learnable: 3 classes of coloured blobs (red, green, blue) on a dark, noisy
16x16 background, the blob at a random place and of a random size, all drawn from `seed`. The train
loader shuffles with an unseeded generator — a different order every time it is read — which the
contract allows: hwnas sorts what it reads, so the fingerprint does not depend on the order.

`broken=...` makes a module that breaks the contract (for the bad-data tests):
- "float_y": y is float32 (class indices must be integers);
- "x3d": x is N×H×W (a channel dimension is missing);
- "no_classes": num_classes is None.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

CLASSES = ["red", "green", "blue"]
SIZE = 16
BROKEN = (None, "float_y", "x3d", "no_classes")


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (float32 N×3×16×16 in 0..1) and their labels (int64): a disc of the class's colour."""
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % len(CLASSES)
    rng.shuffle(y)
    x = rng.uniform(0.0, 0.25, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    for i, label in enumerate(y):
        cy, cx = rng.uniform(4, SIZE - 4, size=2)
        radius = rng.uniform(2.5, 4.5)
        disc = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
        x[i, label][disc] = rng.uniform(0.7, 1.0)
    return x, y


class OwnDataModule(pl.LightningDataModule):
    def __init__(self, seed: int = 0, n_train: int = 150, n_val: int = 30, n_test: int = 30, batch_size: int = 16,
                 broken: str | None = None) -> None:
        super().__init__()
        if broken not in BROKEN:
            raise ValueError(f"broken={broken!r}; allowed: {BROKEN}")
        self.seed, self.batch_size, self.broken = seed, batch_size, broken
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.num_classes = None if broken == "no_classes" else len(CLASSES)
        self.classes = list(CLASSES)
        self.sets: dict[str, TensorDataset] = {}
        self.setup_calls: list[str | None] = []

    def prepare_data(self) -> None:  # the contract: hwnas never calls it (nothing is downloaded)
        raise AssertionError("hwnas called prepare_data()")

    def setup(self, stage: str | None = None) -> None:
        self.setup_calls.append(stage)
        for offset, split in enumerate(("train", "val", "test")):
            if split in self.sets:
                continue
            x, y = blobs(self.sizes[split], self.seed * 10 + offset)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            if self.broken == "float_y":
                yt = yt.float()
            elif self.broken == "x3d":
                xt = xt[:, 0]
            self.sets[split] = TensorDataset(xt, yt)

    def train_dataloader(self) -> DataLoader:
        # Unseeded: each read comes in another order.
        generator = torch.Generator()
        generator.seed()
        return DataLoader(self.sets["train"], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=self.batch_size)


class TrainOnlyDataModule(OwnDataModule):
    """Only a train loader, as the contract allows: hwnas cuts val and test from it (seeded, stratified).
    The other two hooks are Lightning's own, which raise when called, as in a module that never defines them."""

    val_dataloader = pl.LightningDataModule.val_dataloader
    test_dataloader = pl.LightningDataModule.test_dataloader
