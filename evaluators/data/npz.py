"""A researcher's arrays in one `.npz` file: `x`, `y`, optional `x_val`/`y_val`, `x_test`/`y_test`, `classes`.

Read with allow_pickle=False, so an object array (a pickle inside the archive) is refused, never run.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from hwnas.evaluators.data.base import POOL, TEST, VAL, DataError, Scan
from hwnas.evaluators.data.recipe import FileData, check_labels, finite_or_refuse, hash_arrays, to_nchw

PARTS = (("x", "y", POOL), ("x_val", "y_val", VAL), ("x_test", "y_test", TEST))
KNOWN_KEYS = {"x", "y", "x_val", "y_val", "x_test", "y_test", "classes"}


class NpzData(FileData):
    """`dataset=npz dataset.path=FILE`: x as N×H×W, N×H×W×C or N×C×H×W (uint8 0..255, or float as given)."""

    kind = "npz"
    path_allowed = "the path of an .npz file"

    def _load(self) -> dict[str, np.ndarray]:
        file = self._source()
        if not file.is_file():
            raise DataError(f"dataset.path: {str(file)!r} is not a file; allowed: an .npz file with arrays x and y")
        try:
            with np.load(file, allow_pickle=False) as archive:
                keys = list(archive.files)
                unknown = sorted(set(keys) - KNOWN_KEYS)
                if unknown:
                    raise DataError(f"dataset.path: {file.name} holds unknown array {unknown[0]!r}; allowed: {', '.join(sorted(KNOWN_KEYS))}")
                arrays = {k: archive[k] for k in keys}
        except DataError:
            raise
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "object" in str(exc).lower():
                raise DataError(f"dataset.path: {file.name} holds an object array (a pickle); allowed: numeric arrays only") from None
            raise DataError(f"dataset.path: {file.name} is not a readable .npz ({exc}); allowed: numpy.savez output") from None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"dataset.path: {file.name} is not a readable .npz ({type(exc).__name__}); allowed: numpy.savez output") from None
        for key in ("x", "y"):
            if key not in arrays:
                raise DataError(f"dataset.path: {file.name} has no array {key!r}; allowed: arrays x and y (+ x_val/y_val, x_test/y_test, classes)")
        return arrays

    def _parts(self, arrays: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[str]]:
        classes = None
        if "classes" in arrays:
            c = arrays["classes"]
            if c.ndim != 1 or c.dtype.kind not in "UiS" or len(c) < 2:
                raise DataError(f"classes: {c.dtype} {c.shape} is not a list of names; allowed: a 1-D string array of at least 2 names")
            classes = [str(v.decode() if isinstance(v, bytes) else v) for v in c.tolist()]
        xs, ys, codes = [], [], []
        for xk, yk, code in PARTS:
            if (xk in arrays) != (yk in arrays):
                raise DataError(f"{xk if xk not in arrays else yk}: missing; allowed: {xk} and {yk} together")
            if xk not in arrays:
                continue
            x, y = arrays[xk], arrays[yk]
            if x.dtype.kind not in "uif" or x.dtype.kind == "f" and x.dtype.itemsize > 8:
                raise DataError(f"{xk}: dtype {x.dtype} is not numeric; allowed: uint8 or float")
            if x.dtype.kind in "ui" and x.dtype != np.uint8:
                raise DataError(f"{xk}: dtype {x.dtype}; allowed: uint8 (0..255) or float")
            x = to_nchw(x, xk)
            if len(x) != len(y):
                raise DataError(f"{xk}/{yk}: {len(x)} images but {len(y)} labels; allowed: one label per image")
            if len(x) == 0:
                raise DataError(f"{xk}: is empty; allowed: at least one item")
            finite_or_refuse(x, xk)
            xs.append(x)
            ys.append(check_labels(y, yk, len(classes) if classes else None))
            codes.append(code)
        shapes = {x.shape[1:] for x in xs}
        if len(shapes) > 1:
            raise DataError(f"x, x_val, x_test: shapes {sorted(shapes)} differ; allowed: one C×H×W for all")
        kinds = {x.dtype.kind == "f" for x in xs}
        if len(kinds) > 1:
            raise DataError("x, x_val, x_test: mix uint8 and float; allowed: one dtype for all")
        n_classes = len(classes) if classes else int(max(int(y.max()) for y in ys)) + 1
        return xs, ys, codes, classes or [str(i) for i in range(n_classes)]

    def _checked_parts(self) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[str]]:
        """`_parts` of the file, a DataError naming the file as well as the array key."""
        try:
            xs, ys, codes, classes = self._parts(self._load())
            if len(np.unique(np.concatenate(ys))) < 2:
                raise DataError("y: every label is the same; allowed: at least two classes")
        except DataError as exc:
            text = str(exc)
            raise DataError(text if text.startswith("dataset.path") else f"dataset.path: {Path(self.path).name}: {text}") from None
        return xs, ys, codes, classes

    def _scan(self) -> Scan:
        xs, ys, codes, classes = self._checked_parts()
        labels = np.concatenate(ys)
        own = np.concatenate([np.full(len(y), code, dtype=np.int8) for y, code in zip(ys, codes, strict=True)])
        c, h, w = xs[0].shape[1:]
        return Scan(
            labels=labels, classes=classes, content_hash=hash_arrays(*xs, labels, np.array(classes)),
            own_split=own, channels=1 if c == 1 else 3, dtype="float32" if xs[0].dtype.kind == "f" else "uint8",
            native_size=(h, w), items=xs,
        )
