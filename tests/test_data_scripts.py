"""scripts/digits_to_folder.py and scripts/make_photo_folder.py, run as a user runs them (subprocesses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("china", "flower", "grace_hopper")
PHOTO_CLASSES = sorted(f"{p}_{row}_{col}" for p in PHOTOS for row in ("top", "bottom") for col in ("left", "right"))


def run(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """`python -m hwnas.scripts.<script> args...`, the args as strings (paths and numbers as a shell passes them)."""
    return subprocess.run(
        [sys.executable, "-m", f"hwnas.scripts.{script}", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def class_folders(out: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.iterdir()) for d in sorted(out.iterdir()) if d.is_dir()}


def files(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_digits_native(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = tmp_path / "digits"
    line = ok(run("digits_to_folder", out))
    assert line.strip().splitlines() == [f"wrote 1797 images (8x8 grayscale PNG) in 10 classes to {out}"]
    folders = class_folders(out)
    assert list(folders) == [str(c) for c in range(10)]
    assert [len(folders[str(c)]) for c in range(10)] == np.bincount(digits.target).tolist()
    assert sorted(p.name for p in out.iterdir()) == list(folders)  # nothing else at the top
    for i in (0, 1796):  # named by load_digits' index, pixels round(v * 255 / 16)
        with Image.open(out / str(digits.target[i]) / f"{i:04d}.png") as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (8, 8))
            assert np.array_equal(np.asarray(img), np.rint(digits.images[i] * 255 / 16).astype(np.uint8))


def test_digits_upscaled_rgb(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    out.mkdir()  # an empty folder is accepted
    ok(run("digits_to_folder", out, "--size", 16, "--rgb", "--seed", 3))
    folders = class_folders(out)
    assert list(folders) == [str(c) for c in range(10)]
    assert sum(map(len, folders.values())) == 1797
    for path in (folders["0"][0], folders["7"][-1]):
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (16, 16))
            pixels = np.asarray(img).astype(int)
        assert (pixels.max(axis=-1) > pixels.min(axis=-1)).any()  # tinted: the channels differ
        blocks = np.repeat(np.repeat(pixels[::2, ::2], 2, axis=0), 2, axis=1)
        assert (pixels == blocks).all()  # NEAREST: each source pixel is a 2x2 block of one value
        assert (pixels == 0).all(axis=-1).any()  # the background stays black


def test_photo_folder(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    line = ok(run("make_photo_folder", out, "--per-class", 5, "--size", 32))
    folders = class_folders(out)
    assert list(folders) == PHOTO_CLASSES
    assert {name: [p.name for p in paths] for name, paths in folders.items()} == {
        name: [f"{i:04d}.jpg" for i in range(5)] for name in PHOTO_CLASSES
    }
    assert sorted(p.name for p in out.iterdir() if not p.is_dir()) == ["SOURCE.txt"]
    for paths in folders.values():
        with Image.open(paths[0]) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
            pixels = np.asarray(img).astype(int)
        assert pixels.std() > 0
    source = (out / "SOURCE.txt").read_text()
    sources = [Path(p) for p in line.split("photographs: ")[1].strip().split(", ")]
    assert [p.name for p in sources] == ["china.jpg", "flower.jpg", "grace_hopper.jpg"]
    for photo in sources:  # real files, named in SOURCE.txt with their hash
        assert photo.is_file() and str(photo) in source
    assert "60 images (5 per class, 32x32 RGB jpg) in 12 classes" in line
    assert all(name in source for name in PHOTO_CLASSES)


def test_photo_folder_is_deterministic(tmp_path: Path) -> None:
    args = ("--size", 24, "--seed", 7, "--format", "png")
    ok(run("make_photo_folder", tmp_path / "a", "--per-class", 4, *args))
    ok(run("make_photo_folder", tmp_path / "b", "--per-class", 4, *args))
    ok(run("make_photo_folder", tmp_path / "fewer", "--per-class", 2, *args))
    ok(run("make_photo_folder", tmp_path / "other_seed", "--per-class", 4, "--size", 24, "--seed", 8, "--format", "png"))
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(a) == 12 * 4 + 1 and a == b  # same seed: the same bytes, SOURCE.txt included
    with Image.open(tmp_path / "a" / PHOTO_CLASSES[0] / "0000.png") as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (24, 24))
    fewer = files(tmp_path / "fewer")
    images = [name for name in fewer if name != "SOURCE.txt"]
    assert len(images) == 12 * 2 and all(fewer[name] == a[name] for name in images)  # a prefix of the larger run
    other = files(tmp_path / "other_seed")
    assert sum(other[name] != a[name] for name in a if name != "SOURCE.txt") == 12 * 4  # another seed: other crops


@pytest.mark.parametrize("script", ["digits_to_folder", "make_photo_folder"])
def test_non_empty_out_is_refused(tmp_path: Path, script: str) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run(script, out)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "not empty" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary folder left beside it
