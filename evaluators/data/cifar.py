"""CIFAR-10 / CIFAR-100 in their published binary form (never the pickled Python version).

CIFAR-10 (`cifar-10-batches-bin/`): data_batch_1..5.bin and test_batch.bin, records of 1 label byte
+ 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32×32); batches.meta.txt names the classes.
CIFAR-100 (`cifar-100-binary/`): train.bin and test.bin, records of 1 coarse + 1 fine label byte
+ 3072 pixel bytes; fine_label_names.txt / coarse_label_names.txt name the classes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.evaluators.data.base import POOL, TEST, DataError, Scan
from hwnas.evaluators.data.recipe import FileData

PIXELS = 3 * 32 * 32
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LABELS = ("fine", "coarse")


class _CifarBinary(FileData):
    kind = "cifar"
    path_allowed = "the folder of the binary distribution"
    folder_name = ""
    label_bytes = 1
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()

    def __init__(self, **common: Any) -> None:
        common.setdefault("channels", 3)
        super().__init__(**common)

    @property
    def record(self) -> int:
        return self.label_bytes + PIXELS

    def _folder(self) -> Path:
        given = self._source()
        # Either the batches folder itself or the folder the archive was unpacked into.
        for folder in (given, given / self.folder_name):
            if all((folder / name).is_file() for name in (*self.train_files, *self.test_files)):
                return folder
        # Name the file missing where the user put the batches (the unpacked folder when there is one).
        near = given / self.folder_name if (given / self.folder_name).is_dir() else given
        missing = next(n for n in (*self.train_files, *self.test_files) if not (near / n).is_file())
        raise DataError(
            f"dataset.path: {str(given)!r} has no {missing} (nor {self.folder_name}/{missing}); allowed: the folder of the "
            f"{self.kind} binary distribution ({', '.join((*self.train_files, *self.test_files))})"
        )

    def _records(self, file: Path) -> np.ndarray:
        size = file.stat().st_size
        if size == 0 or size % self.record:
            raise DataError(
                f"dataset.path: {file.name} is {size} bytes, not a whole number of {self.record}-byte records; "
                f"allowed: the published {self.kind} binary file"
            )
        return np.fromfile(file, dtype=np.uint8).reshape(-1, self.record)

    def _label_column(self) -> int:
        return 0

    def _classes(self, folder: Path) -> list[str]:
        raise NotImplementedError

    def _read(self) -> tuple[np.ndarray, np.ndarray, Path]:
        folder = self._folder()
        parts, codes = [], []
        for names, code in ((self.train_files, POOL), (self.test_files, TEST)):
            for name in names:
                records = self._records(folder / name)
                parts.append(records)
                codes.append(np.full(len(records), code, dtype=np.int8))
        records = np.concatenate(parts)
        return records, np.concatenate(codes), folder

    def _locate(self, folder: Path, index: int) -> tuple[str, int]:
        """(file name, record number in it) of record `index` of the files read in order."""
        for name in (*self.train_files, *self.test_files):
            count = (folder / name).stat().st_size // self.record
            if index < count:
                return name, index
            index -= count
        raise IndexError(index)

    def _scan(self) -> Scan:
        records, own, folder = self._read()
        labels = records[:, self._label_column()].astype(np.int64)
        classes = self._classes(folder)
        if labels.max() >= len(classes):
            bad = int(np.argmax(labels >= len(classes)))
            name, record = self._locate(folder, bad)
            raise DataError(
                f"dataset.path: {name} record {record} has label {int(labels[bad])}; "
                f"allowed: 0..{len(classes) - 1} for {self.kind}"
            )
        digest = hashlib.sha256(records.data)  # the records' buffer: no copy of a 180 MB array
        digest.update(repr(classes).encode())
        return Scan(
            labels=labels, classes=classes, content_hash=digest.hexdigest() + f"|{self._label_column()}",
            own_split=own, channels=3, dtype="uint8", native_size=(32, 32),
            items=[records[:, self.label_bytes :].reshape(-1, 3, 32, 32)],
        )


def _names_file(file: Path, expected: int) -> list[str] | None:
    if not file.is_file():
        return None
    names = [line.strip() for line in file.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) != expected:
        raise DataError(f"dataset.path: {file.name} names {len(names)} classes; allowed: exactly {expected}")
    return names


class Cifar10Data(_CifarBinary):
    """`dataset=cifar10 dataset.path=DIR`: 50,000 train (val cut from it) and 10,000 test images, 10 classes."""

    kind = "cifar10"
    folder_name = "cifar-10-batches-bin"
    train_files = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
    test_files = ("test_batch.bin",)

    def _classes(self, folder: Path) -> list[str]:
        return _names_file(folder / "batches.meta.txt", 10) or list(CIFAR10_CLASSES)


class Cifar100Data(_CifarBinary):
    """`dataset=cifar100 dataset.path=DIR`: 100 fine classes (or 20 coarse ones: `dataset.label=coarse`)."""

    kind = "cifar100"
    folder_name = "cifar-100-binary"
    label_bytes = 2
    train_files = ("train.bin",)
    test_files = ("test.bin",)

    def __init__(self, *, label: str = "fine", **common: Any) -> None:
        if label not in LABELS:
            raise ValueError(f"dataset.label: {label!r} is unknown; allowed: {', '.join(LABELS)}")
        self.label = label
        super().__init__(**common)

    def _label_column(self) -> int:
        return 1 if self.label == "fine" else 0

    def _classes(self, folder: Path) -> list[str]:
        count = 100 if self.label == "fine" else 20
        names = _names_file(folder / f"{self.label}_label_names.txt", count)
        return names or [str(i) for i in range(count)]
