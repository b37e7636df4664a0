"""A folder of images in the ImageFolder convention: `DIR/<class>/**/<image>`, class names in sorted order.

PNG, JPEG, BMP and WebP, any mode (L, RGB, RGBA, palette, 16-bit grey) and any size. Every file is
read once per sweep to hash it (the fingerprint) and read its header; pixels are decoded only when
the cache for this fingerprint, resolution and channel count does not exist yet — in parallel
processes that write straight into the memory-mapped cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.evaluators.data.base import POOL, DataError, Scan
from hwnas.evaluators.data.recipe import FileData

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
COLOUR_MODES = {"P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
RESIZE_MODES = ("crop", "stretch")
# Below this many images, decoding in this process beats starting worker processes.
PARALLEL_FROM = 2000


def _allowed() -> str:
    return ", ".join(e.lstrip(".") for e in EXTENSIONS)


def _bad_image(name: str, why: str) -> DataError:
    return DataError(f"dataset.path: image {name!r} cannot be read ({why}); allowed: a complete {_allowed()} file")


def read_header(root: Path, name: str) -> tuple[str, str, tuple[int, int]]:
    """(sha256 of the file's bytes, image mode, (height, width)) — Pillow reads only the header here."""
    from PIL import Image, UnidentifiedImageError

    data = (root / name).read_bytes()
    if not data:
        raise _bad_image(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode, (width, height) = img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad_image(name, f"{type(exc).__name__}: {str(exc)[:120]}") from None
    if mode not in GREY_MODES | COLOUR_MODES:
        raise DataError(
            f"dataset.path: image {name!r} has mode {mode!r}, which cannot be reconciled with grey or RGB images; "
            "allowed: 8- or 16-bit grey, palette, RGB(A), CMYK"
        )
    return hashlib.sha256(data).hexdigest(), mode, (height, width)


def _converted(img: Any, channels: int) -> Any:
    """The image in mode L (channels 1) or RGB (3): alpha dropped (a palette with transparency goes
    through RGBA, as Pillow asks), 16-bit grey scaled to 8 bits."""
    from PIL import Image

    if img.mode.startswith("I"):
        grey = np.asarray(img, dtype=np.float64)
        scale = 257.0 if grey.max(initial=0) > 255 or img.mode.startswith("I;16") else 1.0
        img = Image.fromarray(np.clip(np.round(grey / scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")


def decode_file(path: Path, name: str, resolution: int, channels: int, resize: str) -> np.ndarray:
    """channels×R×R uint8 of one image file; DataError naming the file when it does not decode completely."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if resize == "crop" and img.format == "JPEG":
                img.draft("RGB" if channels == 3 else "L", (resolution, resolution))  # decode at a reduced scale
            img.load()  # a truncated file fails here, not later
            width, height = img.size
            if resize == "crop":
                side = min(width, height)
                left, top = (width - side) // 2, (height - side) // 2
                box = (left, top, left + side, top + side)
            else:
                box = (0, 0, width, height)
            resized = _converted(img, channels).resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _bad_image(name, f"{type(exc).__name__}: {str(exc)[:120]}") from None
    out = np.asarray(resized, dtype=np.uint8)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


class ImageFolderData(FileData):
    """`dataset=image_folder dataset.path=DIR`: one sub-folder per class, images resized to `resolution`."""

    kind = "image_folder"
    path_allowed = "a folder with one sub-folder per class"

    def __init__(self, *, resize: str = "crop", decode_workers: int | None = None, **common: Any) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"dataset.resize: {resize!r} is unknown; allowed: {', '.join(RESIZE_MODES)}")
        if decode_workers is not None and (isinstance(decode_workers, bool) or not isinstance(decode_workers, int) or decode_workers < 1):
            raise ValueError(f"dataset.decode_workers: {decode_workers!r} is invalid; allowed: an int >= 1 or null (all cores)")
        super().__init__(**common)
        self.resize = resize
        self.decode_workers = decode_workers

    def _decode_settings(self) -> dict[str, Any]:
        return {"resize": self.resize}

    def _index(self) -> tuple[list[str], list[str], np.ndarray]:
        """(class names, relative image paths, labels), sorted; DataError on an unusable layout."""
        root = self._source()
        if not root.is_dir():
            raise DataError(f"dataset.path: {str(root)!r} is not a folder; allowed: a folder with one sub-folder of images per class")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"dataset.path: {str(root)!r} has no class sub-folders; allowed: one sub-folder of images per class")
        if len(classes) < 2:
            raise DataError(f"dataset.path: {str(root)!r} has a single class ({classes[0]!r}); allowed: at least two class sub-folders")
        names: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            found = []
            for folder, dirs, files in os.walk(root / cls):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = Path(folder).relative_to(root)
                found += [(rel / f).as_posix() for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
            if not found:
                raise DataError(f"dataset.path: class folder {cls!r} holds no images; allowed: {_allowed()} files in every class folder")
            found.sort()
            names += found
            labels += [label] * len(found)
        return classes, names, np.asarray(labels, dtype=np.int64)

    def _scan(self) -> Scan:
        classes, names, labels = self._index()
        root = self._source()
        # One thread: hashing and header parsing hold the GIL here (a thread pool measured 4x slower,
        # 7.6 s vs 1.9 s for 50k PNGs) and worker processes lose more to start-up and pipes than they win.
        headers = [read_header(root, n) for n in names]
        digest = hashlib.sha256()
        for name, label, (file_hash, _, _) in zip(names, labels, headers, strict=True):
            digest.update(f"{name}\0{label}\0{file_hash}\n".encode())
        colour = any(mode in COLOUR_MODES for _, mode, _ in headers)
        sizes = {size for _, _, size in headers}
        return Scan(
            labels=labels, classes=classes, content_hash=digest.hexdigest(),
            own_split=np.full(len(names), POOL, dtype=np.int8), channels=3 if colour else 1, dtype="uint8",
            names=names, native_size=next(iter(sizes)) if len(sizes) == 1 else None,
        )

    def _decode(self, scan: Scan, out: np.ndarray, resolution: int, channels: int) -> dict[str, Any] | None:
        assert scan.names is not None
        names, root = scan.names, str(self._source())
        workers = self._workers()
        if workers == 1 or len(names) < PARALLEL_FROM:
            for i, name in enumerate(names):
                out[i] = decode_file(Path(root) / name, name, resolution, channels, self.resize)
            return {"decode_workers": 1}
        if not isinstance(out, np.memmap) or out.filename is None:
            raise TypeError("parallel decoding writes into the cache file: `out` must be its np.memmap")
        out.flush()
        job = {"x_path": str(Path(out.filename)), "root": root, "resolution": resolution, "channels": channels, "resize": self.resize}
        _run_workers(job, names, workers, "decoded")
        return {"decode_workers": workers}

    def _workers(self) -> int:
        return self.decode_workers or os.cpu_count() or 1


def _run_workers(job: dict[str, Any], names: list[str], workers: int, verb: str) -> list[str]:
    """Run `job` over `names` in `workers` `decode_worker` processes, each on a contiguous share; return
    their output lines in item order (one per item). A progress line every ~10 s; the first bad file
    stops them all (DataError naming it)."""
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    bounds = np.linspace(0, len(names), workers + 1).astype(int)
    outputs: list[list[str]] = [[] for _ in range(workers)]
    procs: list[tuple[subprocess.Popen[str], Any]] = []

    def collect(i: int, stream: Any) -> None:
        for line in stream:
            outputs[i].append(line.rstrip("\n"))

    readers = []
    try:
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker cannot block on it
            proc = subprocess.Popen(
                [sys.executable, "-m", "hwnas.evaluators.data.decode_worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            )
            procs.append((proc, err))
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({**job, "start": int(a), "names": names[a:b]}))
            proc.stdin.close()
            reader = threading.Thread(target=collect, args=(i, proc.stdout), daemon=True)
            reader.start()
            readers.append(reader)
        started = last = time.monotonic()
        while any(p.poll() is None for p, _ in procs):
            for proc, err in procs:
                if proc.returncode not in (None, 0):
                    raise _worker_failed(proc.returncode, err)
            time.sleep(0.1)
            now = time.monotonic()
            if now - last >= 10.0:
                finished = sum(len(o) for o in outputs)
                rate = finished / (now - started)
                eta = (len(names) - finished) / rate if rate > 0 else float("nan")
                print(f"[hwnas] data: {verb} {finished}/{len(names)} images, {rate:.0f}/s, ETA {eta:.0f} s", file=sys.stderr)
                last = now
        for proc, err in procs:
            if proc.returncode != 0:
                raise _worker_failed(proc.returncode, err)
        for reader in readers:
            reader.join()
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()  # a bad file ends the work now, not after every other share
                proc.wait()
            err.close()
        for reader in readers:
            reader.join(timeout=5)
    lines = [line for out in outputs for line in out]
    if len(lines) != len(names):
        raise DataError(f"dataset.path: the image workers reported {len(lines)} of {len(names)} images; allowed: run again")
    return lines


def _worker_failed(returncode: int, err: Any) -> DataError:
    err.seek(0)
    lines = [line.strip() for line in err.read().splitlines() if line.strip()]
    if returncode == 2 and lines:
        return DataError(lines[-1])  # the worker's own one-line DataError, naming the file
    return DataError(f"dataset.path: an image decoding process failed (exit {returncode}: {lines[-1][:200] if lines else 'no message'})")
