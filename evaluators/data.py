"""Small image-classification datasets: fixed train/val/test splits as numpy arrays and torch loaders.

Neither Lightning nor torch is imported on import: the driver builds these recipes (and pickles
them to the workers) without paying ~9 s of imports; training wraps them in a LightningDataModule
(`evaluators.train.SplitsDataModule`). scikit-learn and torch are imported when the arrays are made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

SPLITS = ("train", "val", "test")


@runtime_checkable
class DataRecipe(Protocol):
    """What a `dataset` config builds (checked after instantiation): fixed splits as arrays and loaders."""

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    def setup(self) -> None: ...

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]: ...

    def loader(self, split: str, *, shuffle: bool) -> DataLoader: ...


def _check_common(
    *, resolution: int, channels: int, val_fraction: float, test_fraction: float, batch_size: int
) -> None:
    if resolution < 8:
        raise ValueError(f"resolution={resolution!r} is too small; allowed: an int >= 8")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not supported; allowed: 1 or 3")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}={value!r} is out of range; allowed: 0 < {name} < 1")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction!r} leaves no training data; "
            "allowed: a sum < 1"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")


class ArrayData:
    """Shared machinery: split raw (N,1,h,w) images, resize, replicate channels, standardise.

    Subclasses implement `_raw() -> (images float32 in [0,1] of shape (N,1,h,w), labels int64)`.
    `setup` is idempotent so that an evaluator can call it once and reuse the arrays.
    """

    def __init__(
        self,
        *,
        resolution: int,
        channels: int,
        val_fraction: float,
        test_fraction: float,
        batch_size: int,
        seed: int,
    ) -> None:
        _check_common(
            resolution=resolution,
            channels=channels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
        )
        self.resolution = resolution
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.seed = seed
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    # -- public interface -----------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    def setup(self) -> None:
        if self._arrays is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = self._raw()
        idx = np.arange(len(labels))
        # Two stratified cuts from one seed: the split is a pure function of (data, fractions, seed).
        idx_trainval, idx_test = train_test_split(
            idx, test_size=self.test_fraction, stratify=labels, random_state=self.seed
        )
        val_of_rest = self.val_fraction / (1.0 - self.test_fraction)
        idx_train, idx_val = train_test_split(
            idx_trainval, test_size=val_of_rest, stratify=labels[idx_trainval], random_state=self.seed
        )
        x = self._resize(images)
        # Standardise with training statistics only, so val/test stay unseen.
        mean = float(x[idx_train].mean())
        std = float(x[idx_train].std()) or 1.0
        x = ((x - mean) / std).astype(np.float32)
        self._arrays = {
            name: (np.ascontiguousarray(x[i]), labels[i].astype(np.int64))
            for name, i in (("train", idx_train), ("val", idx_val), ("test", idx_test))
        }

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 NCHW, y int64) of one split; what ONNX Runtime evaluation and calibration use."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
        self.setup()
        assert self._arrays is not None
        return self._arrays[split]

    def __getstate__(self) -> dict:
        # Ship the recipe, not the arrays: evaluators are pickled to workers, which set up lazily.
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def loader(self, split: str, *, shuffle: bool) -> DataLoader:
        """A torch DataLoader over one split (what Lightning trains on)."""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        x, y = self.arrays(split)
        # Own generator: shuffling order depends on the data module's seed, not on global RNG state.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=0,
            generator=generator if shuffle else None,
        )

    # -- helpers --------------------------------------------------------------------------------
    def _resize(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(images.astype(np.float32))
        if t.shape[-1] != self.resolution or t.shape[-2] != self.resolution:
            t = F.interpolate(
                t, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        if self.channels == 3:
            t = t.repeat(1, 3, 1, 1)
        return t.numpy()


class DigitsData(ArrayData):
    """sklearn's bundled 8x8 digits (1,797 images, 10 classes); no download."""

    @property
    def num_classes(self) -> int:
        return 10

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        return images, digits.target.astype(np.int64)


class SyntheticData(ArrayData):
    """Generated, learnable data for fast tests: one random template per class plus Gaussian noise."""

    def __init__(
        self,
        *,
        n_samples: int,
        num_classes: int,
        resolution: int,
        channels: int,
        val_fraction: float,
        test_fraction: float,
        batch_size: int,
        seed: int,
        noise: float = 0.5,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is too small; allowed: an int >= 2")
        if n_samples < 10 * num_classes:
            raise ValueError(
                f"n_samples={n_samples!r} is too small for {num_classes} classes; "
                f"allowed: an int >= {10 * num_classes}"
            )
        if noise < 0:
            raise ValueError(f"noise={noise!r} is negative; allowed: a float >= 0")
        super().__init__(
            resolution=resolution,
            channels=channels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
            seed=seed,
        )
        self.n_samples = n_samples
        self._num_classes = num_classes
        self.noise = noise

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        # Templates at 8x8 like digits, so resizing behaves the same way for both data sets.
        templates = rng.uniform(0.0, 1.0, size=(self._num_classes, 1, 8, 8)).astype(np.float32)
        labels = np.arange(self.n_samples, dtype=np.int64) % self._num_classes
        rng.shuffle(labels)
        noise = rng.normal(0.0, self.noise, size=(self.n_samples, 1, 8, 8)).astype(np.float32)
        return templates[labels] + noise, labels
