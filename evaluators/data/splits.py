"""Train / val / test assignment: the data's own splits, a user's split file, or seeded stratified cuts."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hwnas.evaluators.data.base import POOL, SPLITS, TEST, TRAIN, VAL, DataError

MAX_SPLIT_FILE_BYTES = 256 * 1024 * 1024


def _cut(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, cut): a seeded cut of `fraction` of `idx`, stratified by label when every class allows it."""
    from sklearn.model_selection import train_test_split

    n_cut = int(round(fraction * len(idx)))
    if n_cut < 1 or n_cut >= len(idx):
        raise DataError(
            f"{len(idx)} items cannot be cut by a fraction of {fraction}: one side would be empty; "
            "allowed: more data or another fraction"
        )
    try:
        rest, cut = train_test_split(idx, test_size=n_cut, stratify=labels[idx], random_state=seed)
    except ValueError:
        # A class with a single item (or more classes than the cut holds) cannot be stratified:
        # a plain seeded cut is the honest fallback.
        rest, cut = train_test_split(idx, test_size=n_cut, random_state=seed)
    return np.sort(rest), np.sort(cut)


def assign(
    labels: np.ndarray, own: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """int8 split code per item. Items the data puts in a split stay there; the POOL gives up a test
    cut (only when the data has no test split) and then a val cut (only when it has no val split),
    each a fraction of the whole pool, seeded and stratified."""
    split = own.astype(np.int8).copy()
    pool = np.flatnonzero(split == POOL)
    if len(pool):
        has_test, has_val = bool((split == TEST).any()), bool((split == VAL).any())
        n_pool = len(pool)
        if not has_test:
            pool, test = _cut(pool, labels, test_fraction, seed)
            split[test] = TEST
        if not has_val:
            # val_fraction is of the whole pool, as the user wrote it, not of what the test cut left.
            pool, val = _cut(pool, labels, min(val_fraction * n_pool / len(pool), 0.99), seed)
            split[val] = VAL
        split[pool] = TRAIN
    for code, name in enumerate(SPLITS):
        if not (split == code).any():
            raise DataError(f"the {name} split is empty; allowed: data with items in train, val and test")
    if len(np.unique(labels[split == TRAIN])) < 2:
        raise DataError("the train split holds a single class; allowed: at least two classes to train on")
    return split


def read_split_file(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """Split codes from a CSV of `path,split` rows (a header row `path,split` is allowed).

    `names` are the items' names as the source gives them (paths relative to the dataset folder, or
    row numbers of an array file). Every item must be listed exactly once, each split non-empty."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"dataset.splits: {str(file)!r} is not a file; allowed: a CSV of path,split rows")
    if file.stat().st_size > MAX_SPLIT_FILE_BYTES:
        raise DataError(f"dataset.splits: {str(file)!r} is larger than {MAX_SPLIT_FILE_BYTES >> 20} MiB")
    index = {name: i for i, name in enumerate(names)}
    codes = np.full(len(names), -9, dtype=np.int8)
    with file.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (line_no == 1 and [c.strip().lower() for c in row] == ["path", "split"]):
                continue
            if len(row) != 2:
                raise DataError(f"dataset.splits: {file.name} line {line_no} has {len(row)} fields; allowed: path,split")
            name, split = row[0].strip().replace("\\", "/"), row[1].strip()
            if split not in SPLITS:
                raise DataError(f"dataset.splits: {file.name} line {line_no}: split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
            if name not in index:
                raise DataError(f"dataset.splits: {file.name} line {line_no}: {name!r} is not an item of the dataset")
            i = index[name]
            if codes[i] != -9:
                raise DataError(f"dataset.splits: {file.name} line {line_no}: {name!r} is listed twice; allowed: once")
            codes[i] = SPLITS.index(split)
    missing = np.flatnonzero(codes == -9)
    if len(missing):
        raise DataError(
            f"dataset.splits: {file.name} does not list {len(missing)} item(s), e.g. {names[missing[0]]!r}; "
            "allowed: every item exactly once"
        )
    for code, split in enumerate(SPLITS):
        if not (codes == code).any():
            raise DataError(f"dataset.splits: {file.name} puts no item in {split}; allowed: items in train, val and test")
    return codes


__all__ = ["assign", "read_split_file", "TRAIN", "VAL", "TEST", "POOL"]
