"""The decode-once cache: one folder per (data fingerprint, decode settings), memory-mapped by every trial.

    <root>/<key>/x.npy      (N, C, R, R) uint8 or float32, written in place by the decoder
                 y.npy      (N,) int64 labels
                 split.npy  (N,) int8 split codes (0 train, 1 val, 2 test)
                 meta.json  fingerprint, classes, shape, normalisation, decode time

A folder is built under a temporary name and renamed into place when complete, so a reader never
sees half a cache, and two drivers racing on one shared cache both end with the same folder. The
folder may come from a run folder someone handed over: it is read with allow_pickle=False and every
shape, dtype and value range is checked before use.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.evaluators.data.base import DataError

CACHE_VERSION = 2  # 2: arrays resized with Pillow (was torch)
META = "meta.json"
MAX_META_BYTES = 16 * 1024 * 1024
DTYPES = ("uint8", "float32")


@dataclass
class Cache:
    path: Path
    x: np.ndarray  # memory-mapped, read-only
    y: np.ndarray
    split: np.ndarray
    meta: dict[str, Any]


def pixel_scale(dtype: str) -> float:
    """What a cached value is divided by before normalising: uint8 images hold 0..255, float arrays are as given."""
    return 255.0 if dtype == "uint8" else 1.0


def new_folder(root: Path, key: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def allocate(folder: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """A writable memory-mapped x.npy (a real .npy: np.load reads it without pickle)."""
    return np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.dtype(dtype), shape=shape)


def commit(tmp: Path, root: Path, key: str, y: np.ndarray, split: np.ndarray, meta: dict[str, Any]) -> Path:
    np.save(tmp / "y.npy", y.astype(np.int64), allow_pickle=False)
    np.save(tmp / "split.npy", split.astype(np.int8), allow_pickle=False)
    (tmp / META).write_text(json.dumps({**meta, "version": CACHE_VERSION}, indent=1))
    final = root / key
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished the same cache first: keep theirs (same key, same content).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / META).is_file():
            raise
    return final


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def open_cache(folder: Path, *, fingerprint: str, shape: tuple[int, int, int], dtype: str, num_classes: int) -> Cache:
    """The cache in `folder`, checked against what the recipe expects; DataError if it is not that."""

    def damaged(why: str) -> DataError:
        return DataError(f"data cache {str(folder)!r} is damaged ({why}); allowed: delete the folder and it is rebuilt")

    meta_file = folder / META
    if meta_file.stat().st_size > MAX_META_BYTES:
        raise damaged("meta.json too large")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise damaged(f"meta.json: {type(exc).__name__}") from None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise damaged("unknown version")
    if meta.get("fingerprint") != fingerprint:
        raise damaged(f"fingerprint {meta.get('fingerprint')!r}, expected {fingerprint!r}")
    try:
        x = np.load(folder / "x.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(folder / "y.npy", allow_pickle=False)
        split = np.load(folder / "split.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise damaged(f"{type(exc).__name__}: {exc}") from None
    n = len(y)
    if x.dtype != np.dtype(dtype) or x.shape != (n, *shape):
        raise damaged(f"x is {x.dtype} {x.shape}, expected {dtype} {(n, *shape)}")
    if y.dtype != np.int64 or y.ndim != 1 or split.dtype != np.int8 or split.shape != (n,):
        raise damaged("labels or split have the wrong type or length")
    if n and (y.min() < 0 or y.max() >= num_classes or split.min() < 0 or split.max() > 2):
        raise damaged("labels or split codes out of range")
    for key in ("mean", "std"):
        values = meta.get(key)
        if not (isinstance(values, list) and len(values) == shape[0] and all(isinstance(v, (int, float)) for v in values)):
            raise damaged(f"{key} is not one number per channel")
    if not all(np.isfinite(meta["mean"])) or not all(v > 0 and np.isfinite(v) for v in meta["std"]):
        raise damaged("mean/std not finite and positive")
    return Cache(folder, x, y, split, meta)


def channel_stats(x: np.ndarray, idx: np.ndarray, scale: float, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of x[idx] / scale, in float64, a chunk at a time (x may be larger than memory)."""
    channels = x.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, len(idx), chunk):
        block = np.asarray(x[idx[start : start + chunk]], dtype=np.float64) / scale
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant channel would divide by zero; leave it unscaled instead.
    std = np.where(std > 1e-8, std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]
