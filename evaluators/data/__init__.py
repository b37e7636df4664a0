"""Datasets: each one a config group choice (`conf/dataset/`), each a `DataRecipe` (interface in `base.py`).

Shipped: `DigitsData` and `SyntheticData` (no files needed), `ImageFolderData`, `NpzData`,
`Cifar10Data` / `Cifar100Data` (the binary distributions) and `LightningData` (any LightningDataModule).
All share `recipe.CachedData`: splits, fingerprint, the decode-once cache and normalisation.
"""

from hwnas.evaluators.data.base import SPLITS, DataError, DataRecipe, Scan
from hwnas.evaluators.data.builtin import DigitsData, SyntheticData
from hwnas.evaluators.data.cifar import Cifar10Data, Cifar100Data
from hwnas.evaluators.data.image_folder import ImageFolderData
from hwnas.evaluators.data.lightning import LightningData
from hwnas.evaluators.data.npz import NpzData
from hwnas.evaluators.data.recipe import CachedData

__all__ = [
    "SPLITS", "CachedData", "Cifar10Data", "Cifar100Data", "DataError", "DataRecipe", "DigitsData", "ImageFolderData",
    "LightningData", "NpzData", "Scan", "SyntheticData",
]
