"""The interface every dataset meets (`DataRecipe`), and what a data source hands to the cache (`Scan`).

A dataset's life in a sweep:
1. `prepare(cache_root)` — the driver, once per sweep, before any trial: read and check the source
   (bad data is a `DataError`, one line naming the file or key), assign the splits, hash content and
   split into the fingerprint, and decode everything once into a uint8 (or float32) memory-mapped
   cache keyed by that fingerprint. Workers and later sweeps on the same data reuse the cache.
2. `setup()` — any process: open the cache (memory-mapped; nothing is decoded again).
3. `loader(...)`, `arrays(...)`, `sample(...)` — normalised float32 NCHW batches for training,
   ONNX Runtime accuracy and calibration, of "train", "val", "test" or "trainval" (train and val
   together: final training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

SPLITS = ("train", "val", "test")
# Pseudo-splits: unions of the stored splits, read like one (final training fits on train + val).
UNIONS = {"trainval": ("train", "val")}
FIT_SPLITS = ("train", "trainval")  # what training reads: augmented when shuffled and augment is on
# Split codes in a Scan: an item's own split, or POOL (train data from which val/test may be carved).
TRAIN, VAL, TEST, POOL = 0, 1, 2, -1


class DataError(ValueError):
    """Bad data, found before any trial: one line naming the file or key and what is allowed."""


@dataclass
class Scan:
    """What a source knows after reading its index (labels, names) and hashing its content.

    Decoding pixels is a separate step (`CachedData._decode`), done only when the cache is missing."""

    labels: np.ndarray  # int64 (N,), 0 <= label < len(classes)
    classes: list[str]
    content_hash: str  # of the files or arrays (names, bytes, labels); the split is hashed separately
    own_split: np.ndarray  # int8 (N,): TRAIN / VAL / TEST where the data says so, else POOL
    channels: int  # the data's own channel count (1 or 3): what `channels: null` becomes
    dtype: str  # what the cache holds: "uint8" (images, 0..255) or "float32" (arrays as given)
    names: list[str] | None = None  # item names a split file refers to (relative paths); None: row numbers
    native_size: tuple[int, int] | None = None  # (H, W) when every item has it: what `resolution: null` becomes
    # The items as read (N_i×C×h×w arrays, in item order) where hashing them meant reading them all
    # (arrays, CIFAR records, a DataModule): the default `_decode` resizes these instead of reading
    # the source a second time. None: the source decodes its own files (image folders).
    items: list[np.ndarray] | None = None


@runtime_checkable
class DataRecipe(Protocol):
    """What a `dataset` config builds (checked after instantiation). See the module docstring."""

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def fingerprint(self) -> str | None: ...

    def prepare(self, cache_root: str | Path) -> dict[str, Any]: ...

    def setup(self) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]: ...

    def sample(self, split: str, n: int, seed: int) -> np.ndarray: ...

    def loader(self, split: str, *, shuffle: bool, seed: int | None = None) -> DataLoader: ...
