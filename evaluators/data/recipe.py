"""`CachedData`: the machinery every shipped dataset shares — options, splits, fingerprint, the
decode-once cache, normalisation, and the batches training and evaluation read.

A source (image folder, array file, CIFAR binaries, a LightningDataModule) implements two hooks:
`_scan()` reads its index and hashes its content (cheap, every sweep) and `_decode(scan, out, ...)`
writes every item, resized, into the cache array (only when that cache does not exist yet).
Neither torch nor Pillow is imported on import: the driver builds recipes without paying for them.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from hwnas.evaluators.data import cache as cache_io
from hwnas.evaluators.data.base import FIT_SPLITS, SPLITS, TRAIN, UNIONS, DataError, Scan
from hwnas.evaluators.data.splits import assign, read_split_file

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

FINGERPRINT_CHARS = 16
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what Pillow's convert("L") uses


def _fraction(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"dataset.{key}: {value!r} is out of range; allowed: 0 < {key} < 1")
    return float(value)


class CachedData:
    """Options every dataset shares; see conf/dataset/*.yaml for what each one means."""

    kind = "dataset"

    def __init__(
        self,
        *,
        resolution: int | None,
        channels: int | None,
        val_fraction: float,
        test_fraction: float,
        batch_size: int,
        seed: int,
        augment: bool = False,
        crop_padding: int = 4,
        hflip: bool = True,
        splits: str | None = None,
        cache_dir: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8):
            raise ValueError(f"dataset.resolution: {resolution!r} is too small; allowed: an int >= 8")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"dataset.channels: {channels!r} is not supported; allowed: 1, 3 or null (from the data)")
        val_fraction, test_fraction = _fraction("val_fraction", val_fraction), _fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"dataset: val_fraction + test_fraction = {val_fraction + test_fraction!r} leaves no training data; "
                "allowed: a sum < 1"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"dataset.batch_size: {batch_size!r} is invalid; allowed: an int >= 1")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"dataset.crop_padding: {crop_padding!r} is invalid; allowed: an int >= 0")
        if fingerprint is not None and not (isinstance(fingerprint, str) and len(fingerprint) == FINGERPRINT_CHARS):
            raise ValueError(f"dataset.fingerprint: {fingerprint!r} is not a fingerprint; allowed: {FINGERPRINT_CHARS} hex digits or null")
        self.resolution = resolution
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.augment = bool(augment)
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)
        self.splits = splits
        self.cache_dir = cache_dir
        self.expected_fingerprint = fingerprint
        # Small and picklable: what workers need to open the cache the driver built.
        self._prepared: dict[str, Any] | None = None
        self._cache: cache_io.Cache | None = None
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._affine: tuple[np.ndarray, np.ndarray] | None = None  # per-channel gain and offset of the open cache
        self.load_seconds = 0.0  # time spent making training/eval batches in this process

    # -- source hooks ---------------------------------------------------------------------------
    def _scan(self) -> Scan:
        raise NotImplementedError

    def _decode(self, scan: Scan, out: np.ndarray, resolution: int, channels: int) -> dict[str, Any] | None:
        """Fill `out`; may return facts for the cache's meta.json (e.g. how many processes decoded).
        By default: resize the items the scan already read (`Scan.items`)."""
        if scan.items is None:
            raise NotImplementedError(f"{type(self).__name__} reads no items in _scan and decodes none")
        start = 0
        for items in scan.items:
            resize_arrays(items, out[start : start + len(items)], resolution, channels)
            start += len(items)
        return None

    def _decode_settings(self) -> dict[str, Any]:
        """Source options that change decoded pixels (beyond resolution and channels): part of the cache key."""
        return {}

    def _describe(self) -> dict[str, Any]:
        """What the summary says about the source (e.g. its path)."""
        return {}

    # -- preparing (driver, once per sweep) -------------------------------------------------------
    def prepare(
        self, cache_root: str | Path, check_shape: Callable[[tuple[int, int, int]], None] | None = None
    ) -> dict[str, Any]:
        """Check, split, fingerprint and (if needed) decode the data into `cache_dir` or `cache_root`.

        DataError (one line) on bad data, before anything is written; a fingerprint other than the
        configured `dataset.fingerprint` is refused (resume and export pin it). `check_shape` sees the
        input shape (C, R, R) before anything is decoded: the space can refuse a resolution it cannot hold."""
        started = time.perf_counter()
        scan = self._scan()
        channels = self.channels or scan.channels
        resolution = self.resolution or self._native_resolution(scan)
        if check_shape is not None:
            check_shape((channels, resolution, resolution))
        names = scan.names if scan.names is not None else [str(i) for i in range(len(scan.labels))]
        if self.splits is not None:
            split = read_split_file(self.splits, names)
            if len(np.unique(scan.labels[split == TRAIN])) < 2:
                raise DataError(f"dataset.splits: {Path(self.splits).name} puts a single class in train; allowed: at least two")
        else:
            split = assign(
                scan.labels, scan.own_split, val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed
            )
        fingerprint = hashlib.sha256(scan.content_hash.encode() + b"|" + split.tobytes()).hexdigest()[:FINGERPRINT_CHARS]
        if self.expected_fingerprint is not None and fingerprint != self.expected_fingerprint:
            raise DataError(
                f"dataset: the {self.kind} data{self._where()} is not the data this run was made with "
                f"(fingerprint {fingerprint}, the run's {self.expected_fingerprint}); allowed: the same files "
                "and split, or a new run_dir"
            )
        scan_s = time.perf_counter() - started
        key_text = repr((fingerprint, resolution, channels, scan.dtype, sorted(self._decode_settings().items()), cache_io.CACHE_VERSION))
        key = f"{self.kind}-{hashlib.sha256(key_text.encode()).hexdigest()[:FINGERPRINT_CHARS]}"
        root = Path(self.cache_dir).expanduser() if self.cache_dir else Path(cache_root)
        folder = root / key
        shape = (channels, resolution, resolution)
        reused = (folder / cache_io.META).is_file()
        if not reused:
            decode_started = time.perf_counter()
            tmp = cache_io.new_folder(root, key)
            try:
                x = cache_io.allocate(tmp, (len(scan.labels), *shape), scan.dtype)
                facts = self._decode(scan, x, resolution, channels) or {}
                x.flush()
                mean, std = cache_io.channel_stats(x, np.flatnonzero(split == TRAIN), cache_io.pixel_scale(scan.dtype))
                del x
                meta = {
                    "fingerprint": fingerprint, "classes": scan.classes, "shape": list(shape), "dtype": scan.dtype,
                    "mean": mean, "std": std, "decode_s": time.perf_counter() - decode_started, "items": len(scan.labels),
                    **facts,
                }
                folder = cache_io.commit(tmp, root, key, scan.labels, split, meta)
            except BaseException:
                cache_io.discard(tmp)
                raise
        self._prepared = {
            "fingerprint": fingerprint, "cache": str(folder.resolve()), "shape": list(shape), "dtype": scan.dtype,
            "num_classes": len(scan.classes), "scan_s": scan_s, "reused_cache": reused,
        }
        self._cache = None
        self._memo = {}
        self.setup()
        return self.summary()

    def _native_resolution(self, scan: Scan) -> int:
        if scan.native_size is None or scan.native_size[0] != scan.native_size[1]:
            raise DataError(
                f"dataset.resolution: null needs square items of one size, but this {self.kind} data has "
                f"{scan.native_size or 'several sizes'}; allowed: set dataset.resolution to an int >= 8"
            )
        if scan.native_size[0] < 8:
            raise DataError(f"dataset.resolution: the data is {scan.native_size[0]} px; allowed: set dataset.resolution to an int >= 8")
        return scan.native_size[0]

    def _where(self) -> str:
        path = self._describe().get("path")
        return f" at {path!r}" if path else ""

    # -- using (any process) ----------------------------------------------------------------------
    def setup(self) -> None:
        """Open the prepared cache; prepare it first (in a temporary cache) when no driver did."""
        if self._cache is not None:
            return
        if self._prepared is None:
            self.prepare(user_cache_root())
            return
        folder = Path(self._prepared["cache"])
        if not (folder / cache_io.META).is_file():
            # A node that does not share the driver's disk: decode here, pinned to the driver's fingerprint.
            self.expected_fingerprint = self._prepared["fingerprint"]
            self._prepared = None
            self.prepare(folder.parent)
            return
        self._cache = cache_io.open_cache(
            folder,
            fingerprint=self._prepared["fingerprint"],
            shape=tuple(self._prepared["shape"]),  # type: ignore[arg-type]
            dtype=self._prepared["dtype"],
            num_classes=self._prepared["num_classes"],
        )
        # x * 1/(scale*std) - mean/std per channel: what every batch is normalised with.
        norm = self.normalization
        std = np.asarray(norm["std"], dtype=np.float64)
        self._affine = (
            (1.0 / (norm["scale"] * std)).astype(np.float32).reshape(1, -1, 1, 1),
            (np.asarray(norm["mean"], dtype=np.float64) / std).astype(np.float32).reshape(1, -1, 1, 1),
        )

    def _opened(self) -> cache_io.Cache:
        self.setup()
        assert self._cache is not None
        return self._cache

    @property
    def fingerprint(self) -> str | None:
        return self._prepared["fingerprint"] if self._prepared else None

    @property
    def num_classes(self) -> int:
        return len(self._opened().meta["classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self._opened().meta["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self._opened().x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def normalization(self) -> dict[str, Any]:
        meta = self._opened().meta
        return {"scale": cache_io.pixel_scale(meta["dtype"]), "mean": list(meta["mean"]), "std": list(meta["std"])}

    def summary(self) -> dict[str, Any]:
        """What `run_dir/data.json` and the MLflow parent run record about the data."""
        cache = self._opened()
        assert self._prepared is not None
        sizes = {name: int((cache.split == code).sum()) for code, name in enumerate(SPLITS)}
        return {
            "kind": self.kind,
            **self._describe(),
            "fingerprint": self._prepared["fingerprint"],
            "classes": list(cache.meta["classes"]),
            "input_shape": list(self.input_shape),
            "splits": sizes,
            "split_source": "file" if self.splits else "data and seeded stratified cuts",
            "normalization": {
                **self.normalization,
                "formula": "x = (pixel / scale - mean[c]) / std[c], per channel, from the train split",
            },
            "augment": {"enabled": self.augment, "crop_padding": self.crop_padding, "hflip": self.hflip},
            "cache": {
                "path": str(cache.path), "dtype": cache.meta["dtype"], "reused": self._prepared["reused_cache"],
                "decode_s": cache.meta["decode_s"], "scan_s": self._prepared["scan_s"],
                "decode_workers": cache.meta.get("decode_workers"),
            },
        }

    def _indices(self, split: str) -> np.ndarray:
        """Sorted item indices of a split, or of a pseudo-split's parts together ("trainval")."""
        if split in UNIONS:
            codes = [SPLITS.index(part) for part in UNIONS[split]]
            return np.flatnonzero(np.isin(self._opened().split, codes))
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is unknown; allowed: {', '.join((*SPLITS, *UNIONS))}")
        return np.flatnonzero(self._opened().split == SPLITS.index(split))

    def _normalised(self, idx: np.ndarray) -> np.ndarray:
        """float32 NCHW of items `idx` (sorted), normalised with the train split's statistics:
        one array, scaled and shifted in place (x * 1/(scale*std) - mean/std), no temporaries."""
        cache = self._opened()
        assert self._affine is not None  # set whenever the cache is opened
        gain, offset = self._affine
        x = np.asarray(cache.x[idx], dtype=np.float32)
        np.multiply(x, gain, out=x)
        np.subtract(x, offset, out=x)
        return x

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 NCHW normalised, y int64) of a whole split: what ORT accuracy reads.
        Val and test are kept once made; train and trainval are made on every call (they may not fit in memory)."""
        if split in self._memo:
            return self._memo[split]
        idx = self._indices(split)
        out = (np.ascontiguousarray(self._normalised(idx)), self._opened().y[idx].copy())
        if split not in FIT_SPLITS:
            self._memo[split] = out
        return out

    def sample(self, split: str, n: int, seed: int) -> np.ndarray:
        """`n` seeded items of a split (all when it has fewer), normalised: calibration data, examples."""
        idx = self._indices(split)
        if n < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
        return np.ascontiguousarray(self._normalised(idx))

    def loader(self, split: str, *, shuffle: bool, seed: int | None = None) -> DataLoader:
        """Batches of one split for torch/Lightning, read from the memory-mapped cache a batch at a
        time; shuffled batches of the train split (or trainval, final training's train + val) are
        augmented when `augment` is on, seeded by `seed` (val and test never are, shuffled or not)."""
        import torch
        from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

        idx = self._indices(split)
        seed = self.seed if seed is None else seed
        generator = torch.Generator().manual_seed(seed)
        order = RandomSampler(range(len(idx)), generator=generator) if shuffle else SequentialSampler(range(len(idx)))
        batches = _Batches(self, idx, augment=split in FIT_SPLITS and shuffle and self.augment, seed=seed)
        # batch_size=None: the sampler hands whole index lists to _Batches, which reads one slice of
        # the memmap per batch instead of one item at a time.
        return DataLoader(cast(Any, batches), sampler=BatchSampler(order, self.batch_size, drop_last=False), batch_size=None, num_workers=0)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the recipe and where its cache is, not the arrays: workers memory-map the cache.
        state = self.__dict__.copy()
        state["_cache"] = None
        state["_memo"] = {}
        state["_affine"] = None
        state["load_seconds"] = 0.0
        return state


class FileData(CachedData):
    """A source read from the one path the user gives (`dataset.path`: a folder or a file)."""

    path_allowed = "a path"  # what `dataset.path` must name, for the refusal

    def __init__(self, *, path: str, **common: Any) -> None:
        if not isinstance(path, str) or not path:
            raise ValueError(f"dataset.path: {path!r} is not a path; allowed: {self.path_allowed}")
        super().__init__(**common)
        self.path = path

    def _source(self) -> Path:
        return Path(self.path).expanduser()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._source().resolve())}


def user_cache_root() -> Path:
    """This user's own cache for data no driver prepared (notebooks, tests): `<tmp>/hwnas-data-<uid>`,
    mode 0700 and owned by this user, so no one else can plant a cache in it."""
    import os

    folder = Path(tempfile.gettempdir()) / f"hwnas-data-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise DataError(f"data cache {str(folder)!r} is not this user's private folder; allowed: set dataset.cache_dir")
    return folder


class _Batches:
    """Map-style dataset keyed by a list of positions: one memmap read and one normalisation per batch."""

    def __init__(self, data: CachedData, idx: np.ndarray, *, augment: bool, seed: int) -> None:
        self.data = data
        self.idx = idx
        self.augment = augment
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        started = time.perf_counter()
        idx = np.sort(self.idx[np.asarray(positions)])
        x = torch.from_numpy(self.data._normalised(idx))
        y = torch.from_numpy(self.data._opened().y[idx].copy())
        if self.augment:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(self.seed + 1)
            x = augment_batch(x, self.data.crop_padding, self.data.hflip, self.generator)
        self.data.load_seconds += time.perf_counter() - started
        return x, y


def augment_batch(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding (zero is the train mean once normalised) and random horizontal
    flip, drawn per image from `generator`: the CIFAR recipe, vectorised over the batch."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (n,1,h,1)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (n,1,1,w)
        batch = torch.arange(n)[:, None, None, None]
        chans = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


# ---- helpers the sources share ----


def hash_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.data)  # the buffer itself: no copy of a large array
    return digest.hexdigest()


def to_nchw(x: np.ndarray, key: str) -> np.ndarray:
    """N×H×W, N×H×W×C or N×C×H×W (C in 1, 3, 4) to N×C×H×W; DataError naming `key` otherwise."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
            return x
        if x.shape[-1] in (1, 3, 4):
            return x.transpose(0, 3, 1, 2)
    raise DataError(f"{key}: shape {x.shape} is not N×H×W, N×H×W×C or N×C×H×W with C in 1, 3, 4")


def resize_arrays(x: np.ndarray, out: np.ndarray, resolution: int, channels: int, chunk: int = 2048) -> None:
    """Write N×C×h×w arrays into `out` (N×channels×R×R), converting channels (1->3 repeat, 3->1 luma,
    4->3 alpha dropped; a count asked for as it is, e.g. a DataModule's own, kept) and resizing each
    plane bilinearly with Pillow (antialiased when shrinking, as image folders are), a chunk at a time. Pillow, not torch: the driver prepares the data and stays
    free of torch's import and threads."""
    from PIL import Image

    integer = out.dtype == np.uint8
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float32)
        if block.shape[1] == 4 and channels != 4:
            block = block[:, :3]
        if block.shape[1] == 3 and channels == 1:
            block = np.tensordot(np.asarray(LUMA, dtype=np.float32), block, axes=([0], [1]))[:, None]
        if block.shape[-2:] != (resolution, resolution):
            resized = np.empty((len(block), block.shape[1], resolution, resolution), dtype=np.float32)
            for i in range(len(block)):
                for c in range(block.shape[1]):
                    plane = Image.fromarray(np.ascontiguousarray(block[i, c]), mode="F")
                    resized[i, c] = np.asarray(plane.resize((resolution, resolution), Image.Resampling.BILINEAR))
            block = resized
        if block.shape[1] == 1 and channels == 3:
            block = np.repeat(block, 3, axis=1)  # after resizing: one plane resized, not three
        if integer:
            block = np.clip(np.round(block), 0, 255)
        out[start : start + len(block)] = block.astype(out.dtype)


def check_labels(y: np.ndarray, key: str, num_classes: int | None) -> np.ndarray:
    """Integer labels 0..K-1 (K from `classes` when given); DataError naming `key` otherwise."""
    if y.ndim != 1:
        raise DataError(f"{key}: labels have shape {y.shape}; allowed: one integer per item (N,)")
    if y.dtype.kind not in "iu":
        if not (y.dtype.kind == "f" and len(y) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise DataError(f"{key}: labels are {y.dtype}, not integers; allowed: integer class indices 0..K-1")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{key}: label {int(y.min())} is negative; allowed: class indices 0..K-1")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise DataError(f"{key}: label {int(y.max())} is out of range for {num_classes} classes; allowed: 0..{num_classes - 1}")
    return y


def finite_or_refuse(x: np.ndarray, key: str) -> None:
    if x.dtype.kind == "f":
        for start in range(0, len(x), 4096):
            if not np.isfinite(x[start : start + 4096]).all():
                raise DataError(f"{key}: holds NaN or infinite values; allowed: finite numbers")
