"""Data that ships with the machine: scikit-learn's bundled digits, and generated data for tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from hwnas.evaluators.data.base import POOL, Scan
from hwnas.evaluators.data.recipe import CachedData, hash_arrays


class DigitsData(CachedData):
    """sklearn's bundled 8x8 digits (1,797 images, 10 classes, 17 grey levels); no download."""

    kind = "digits"

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 0..16 -> 0..255 exactly at the ends; the cache holds images as uint8 like every image source.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        return images, digits.target.astype(np.int64)

    def _scan(self) -> Scan:
        images, labels = self._raw()
        return Scan(
            labels=labels, classes=[str(i) for i in range(10)], content_hash=hash_arrays(images, labels),
            own_split=np.full(len(labels), POOL, dtype=np.int8), channels=1, dtype="uint8", native_size=(8, 8),
            items=[images],
        )


class SyntheticData(CachedData):
    """Generated, learnable data for fast tests: one random template per class plus Gaussian noise."""

    kind = "synthetic"

    def __init__(self, *, n_samples: int, num_classes: int, noise: float = 0.5, **common: Any) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"dataset.num_classes: {num_classes!r} is too small; allowed: an int >= 2")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 10 * num_classes:
            raise ValueError(
                f"dataset.n_samples: {n_samples!r} is too small for {num_classes} classes; allowed: an int >= {10 * num_classes}"
            )
        if not noise >= 0:
            raise ValueError(f"dataset.noise: {noise!r} is negative; allowed: a float >= 0")
        super().__init__(**common)
        self.n_samples = n_samples
        self._n_classes = num_classes
        self.noise = float(noise)

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        # Templates at 8x8 like digits, so resizing behaves the same way for both data sets.
        templates = rng.uniform(0.0, 1.0, size=(self._n_classes, 1, 8, 8)).astype(np.float32)
        labels = np.arange(self.n_samples, dtype=np.int64) % self._n_classes
        rng.shuffle(labels)
        noise = rng.normal(0.0, self.noise, size=(self.n_samples, 1, 8, 8)).astype(np.float32)
        return templates[labels] + noise, labels

    def _scan(self) -> Scan:
        images, labels = self._raw()
        return Scan(
            labels=labels, classes=[str(i) for i in range(self._n_classes)], content_hash=hash_arrays(images, labels),
            own_split=np.full(len(labels), POOL, dtype=np.int8), channels=1, dtype="float32", native_size=(8, 8),
            items=[images],
        )
