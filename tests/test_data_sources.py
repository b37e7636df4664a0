"""The own-data sources (`ImageFolderData`, `NpzData`, `Cifar10Data`/`Cifar100Data`) on real files
written here: decoding, channels, splits, fingerprint, the decode-once cache, augmentation, and the
one-line `DataError` every kind of bad data gets before any trial.

The cache is read back through its own files (x.npy, y.npy, split.npy, meta.json in the folder the
summary names) so pixel checks see exactly what was decoded, before normalisation.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hwnas.evaluators.data import Cifar10Data, Cifar100Data, DataError, ImageFolderData, NpzData
from hwnas.evaluators.data import image_folder as image_folder_module

COMMON: dict[str, Any] = {
    "resolution": 16, "channels": None, "val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 8, "seed": 0,
}


def folder_data(path: Path, **kw: Any) -> ImageFolderData:
    return ImageFolderData(path=str(path), **{**COMMON, **kw})


def npz_data(path: Path, **kw: Any) -> NpzData:
    return NpzData(path=str(path), **{**COMMON, "resolution": None, **kw})


def save(path: Path, img: Image.Image, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def noise(seed: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Image.Image:
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def cached(summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(x, y, split, meta) as the cache folder holds them."""
    folder = Path(summary["cache"]["path"])
    return (
        np.load(folder / "x.npy"), np.load(folder / "y.npy"), np.load(folder / "split.npy"),
        json.loads((folder / "meta.json").read_text()),
    )


def order(names: list[str]) -> list[str]:
    """The documented item order: classes sorted, then relative paths sorted within each class."""
    return sorted(names, key=lambda n: (n.split("/")[0], n))


def refused(recipe: Any, root: Path, *expected: str) -> str:
    """prepare() raises a one-line DataError holding every `expected` text and leaves no cache behind."""
    with pytest.raises(DataError) as info:
        recipe.prepare(root)
    message = str(info.value)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    assert not root.exists() or list(root.iterdir()) == [], list(root.iterdir())
    return message


# ---- 1. image folders ----

RED, PAL, RGBA = (200, 30, 90), (10, 220, 40), (50, 60, 70, 128)


def mixed_folder(root: Path) -> list[str]:
    """Three classes (written out of order) of every supported format and mode, several sizes, one nested
    folder, plus things that must be ignored. Returns the image names."""
    images = {
        "dog/rgba.png": (Image.new("RGBA", (20, 20), RGBA), {}),
        "dog/grey16.png": (Image.fromarray(np.full((30, 30), 100 * 257, dtype=np.uint16)), {}),
        "dog/pic.bmp": (noise(1, (17, 23)), {}),
        "dog/more.png": (noise(2, (12, 12)), {}),
        "cat/red.png": (Image.new("RGB", (40, 30), RED), {}),
        "cat/grey.jpg": (Image.new("L", (64, 64), 100), {"quality": 95}),
        "cat/sub/deeper/pal.png": (Image.new("P", (17, 23), 1), {}),
        "cat/more.png": (noise(3, (10, 14)), {}),
        "bird/pic.webp": (noise(4, (40, 30)), {"lossless": True}),
        "bird/x.png": (noise(5, (64, 64)), {}),
        "bird/y.png": (noise(6, (17, 23)), {}),
        "bird/Z.JPG": (noise(7, (20, 20)), {}),  # upper-case extension
    }
    for name, (img, kw) in images.items():
        if img.mode == "P":
            img.putpalette([0, 0, 0, *PAL] + [0] * (256 * 3 - 6))
        save(root / name, img, **kw)
    # Ignored: files at the top, text files, hidden files and folders (valid images inside).
    (root / "README.txt").write_text("my data\n")
    (root / "cat" / "README.txt").write_text("cats\n")
    (root / "cat" / "notes.json").write_text("{}")
    save(root / "cat" / ".hidden.png", noise(8))
    save(root / "dog" / ".thumbs" / "t.png", noise(9))
    save(root / ".cache" / "x.png", noise(10))
    save(root / "top.png", noise(11))
    return list(images)


def test_image_folder_reads_every_format_mode_and_size(tmp_path):
    names = mixed_folder(tmp_path / "imgs")
    assert Image.open(tmp_path / "imgs" / "dog/grey16.png").mode == "I;16"  # the 16-bit case is really 16-bit
    assert Image.open(tmp_path / "imgs" / "cat/sub/deeper/pal.png").mode == "P"
    data = folder_data(tmp_path / "imgs")
    summary = data.prepare(tmp_path / "cache")
    assert data.class_names == ["bird", "cat", "dog"] == summary["classes"]
    assert data.num_classes == 3
    assert data.input_shape == (3, 16, 16) == tuple(summary["input_shape"])
    assert sum(summary["splits"].values()) == len(names)  # nested read; hidden, text and top-level files not
    x, y, split, meta = cached(summary)
    assert x.dtype == np.uint8 and x.shape == (len(names), 3, 16, 16)
    ordered = order(names)
    np.testing.assert_array_equal(y, [data.class_names.index(n.split("/")[0]) for n in ordered])
    at = {name: x[i] for i, name in enumerate(ordered)}
    np.testing.assert_array_equal(at["cat/red.png"], np.broadcast_to(np.array(RED, np.uint8)[:, None, None], (3, 16, 16)))
    np.testing.assert_array_equal(at["cat/sub/deeper/pal.png"], np.broadcast_to(np.array(PAL, np.uint8)[:, None, None], (3, 16, 16)))
    np.testing.assert_array_equal(at["dog/rgba.png"], np.broadcast_to(np.array(RGBA[:3], np.uint8)[:, None, None], (3, 16, 16)))
    np.testing.assert_array_equal(at["dog/grey16.png"], np.full((3, 16, 16), 100))  # 16 bit scaled by 257
    for grey in ("cat/grey.jpg", "dog/grey16.png"):  # a grey image in an RGB data set: equal channels
        np.testing.assert_array_equal(at[grey][0], at[grey][1])
        np.testing.assert_array_equal(at[grey][0], at[grey][2])
    assert np.abs(at["cat/grey.jpg"].astype(int) - 100).max() <= 2
    # The lossless WebP decodes to its own pixels (resized the way Pillow resizes them).
    webp = noise(4, (40, 30)).resize((16, 16), Image.Resampling.BILINEAR, box=(5, 0, 35, 30))
    np.testing.assert_array_equal(at["bird/pic.webp"], np.asarray(webp).transpose(2, 0, 1))
    # The train split's statistics normalise: pixels of the train split have mean 0 per channel.
    xt, _ = data.arrays("train")
    np.testing.assert_allclose(xt.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    assert meta["classes"] == ["bird", "cat", "dog"]


def test_grey_images_only_give_one_channel(tmp_path):
    root = tmp_path / "grey"
    save(root / "a/l.png", Image.new("L", (9, 9), 40))
    save(root / "a/g.jpg", Image.new("L", (20, 12), 90), quality=95)
    save(root / "a/one.bmp", Image.new("1", (16, 16), 1))
    save(root / "b/deep16.png", Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)))
    save(root / "b/m.png", noise(1, (16, 16), mode="L"))
    save(root / "b/n.png", noise(2, (16, 16), mode="L"))
    data = folder_data(root)
    summary = data.prepare(tmp_path / "cache")
    assert data.input_shape == (1, 16, 16)
    x, _, _, _ = cached(summary)
    at = dict(zip(order(["a/l.png", "a/g.jpg", "a/one.bmp", "b/deep16.png", "b/m.png", "b/n.png"]), x, strict=True))
    assert (at["a/l.png"] == 40).all() and (at["a/one.bmp"] == 255).all() and (at["b/deep16.png"] == 255).all()
    # channels: 3 on the same grey files repeats the grey plane.
    rgb = folder_data(root, channels=3)
    x3, _, _, _ = cached(rgb.prepare(tmp_path / "cache"))
    assert rgb.input_shape == (3, 16, 16)
    np.testing.assert_array_equal(x3[:, 0:1], x)
    np.testing.assert_array_equal(x3[:, 1:2], x)
    np.testing.assert_array_equal(x3[:, 2:3], x)


def test_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path):
    root = tmp_path / "wide"
    bands = np.zeros((16, 64, 3), dtype=np.uint8)
    bands[:, :24, 0] = 255  # red left, green centre (columns 24..39: the centre square), blue right
    bands[:, 24:40, 1] = 255
    bands[:, 40:, 2] = 255
    save(root / "a/wide.png", Image.fromarray(bands))
    for i in range(3):
        save(root / f"a/s{i}.png", noise(i, (16, 16)))
        save(root / f"b/s{i}.png", noise(10 + i, (16, 16)))
    wide = order([f"{c}/s{i}.png" for c in "ab" for i in range(3)] + ["a/wide.png"]).index("a/wide.png")
    crop = cached(folder_data(root, resize="crop").prepare(tmp_path / "cache"))[0][wide]
    stretch = cached(folder_data(root, resize="stretch").prepare(tmp_path / "cache"))[0][wide]
    green = np.zeros((3, 16, 16), dtype=np.uint8)
    green[1] = 255
    np.testing.assert_array_equal(crop, green)  # the 16x16 centre, at scale 1: green only
    assert (stretch[0, :, :5] == 255).all() and (stretch[1:, :, :5] == 0).all()  # the red quarter survives
    assert (stretch[2, :, -5:] == 255).all() and (stretch[:2, :, -5:] == 0).all()  # and the blue one
    assert (stretch[1, :, 7:9] == 255).all()
    assert not np.array_equal(crop, stretch)


# ---- 2. npz ----


def test_npz_grey_hwc_and_float_chw(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    grey = rng.integers(0, 256, (40, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x=grey, y=y)
    data = npz_data(tmp_path / "grey.npz")
    x, _, _, _ = cached(data.prepare(tmp_path / "cache"))
    assert data.input_shape == (1, 12, 12) and data.class_names == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(x[:, 0], grey)

    hwc = rng.integers(0, 256, (40, 10, 10, 3), dtype=np.uint8)
    hwc[0] = 0
    hwc[0, :, :, 0] = 255  # red
    np.savez(tmp_path / "hwc.npz", x=hwc, y=y)
    data = npz_data(tmp_path / "hwc.npz")
    x, _, _, _ = cached(data.prepare(tmp_path / "cache"))
    assert data.input_shape == (3, 10, 10)
    np.testing.assert_array_equal(x, hwc.transpose(0, 3, 1, 2))
    assert (x[0, 0] == 255).all() and (x[0, 1:] == 0).all()

    chw = rng.normal([[[[5.0]], [[-2.0]], [[100.0]]]], [[[[3.0]], [[0.5]], [[20.0]]]], (40, 3, 8, 8))
    np.savez(tmp_path / "chw.npz", x=chw, y=y)
    data = npz_data(tmp_path / "chw.npz")
    summary = data.prepare(tmp_path / "cache")
    x, _, split, _ = cached(summary)
    assert x.dtype == np.float32 and data.input_shape == (3, 8, 8)
    np.testing.assert_allclose(x, chw.astype(np.float32))
    xt, _ = data.arrays("train")
    assert len(xt) == (split == 0).sum() == summary["splits"]["train"]
    np.testing.assert_allclose(xt.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(xt.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    xv, _ = data.arrays("val")
    assert not np.allclose(xv.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)  # val is normalised with train's stats


def test_npz_given_splits_are_kept_and_classes_named(tmp_path):
    rng = np.random.default_rng(1)
    x, x_val, x_test = (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) for n in (30, 7, 11))
    y, y_val, y_test = (np.arange(n) % 3 for n in (30, 7, 11))
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
             classes=np.array(["ant", "bee", "cow"]))
    data = npz_data(tmp_path / "d.npz")
    summary = data.prepare(tmp_path / "cache")
    assert summary["splits"] == {"train": 30, "val": 7, "test": 11}
    assert data.class_names == ["ant", "bee", "cow"]
    cx, cy, split, _ = cached(summary)
    np.testing.assert_array_equal(cx[split == 2, 0], x_test)
    np.testing.assert_array_equal(cx[split == 1, 0], x_val)
    np.testing.assert_array_equal(cx[split == 0, 0], x)
    np.testing.assert_array_equal(data.arrays("test")[1], y_test)
    norm = data.normalization
    expected = (x_test[:, None] / 255.0 - norm["mean"][0]) / norm["std"][0]
    np.testing.assert_allclose(data.arrays("test")[0], expected, atol=1e-5)
    # Only the test split given: val is cut from x, test stays the file's.
    np.savez(tmp_path / "t.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    part = npz_data(tmp_path / "t.npz").prepare(tmp_path / "cache")
    assert part["splits"]["test"] == 11 and part["splits"]["train"] + part["splits"]["val"] == 30


# ---- 3. CIFAR binaries ----


def cifar_pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_records(file: Path, labels: list[bytes], pixels: np.ndarray) -> None:
    """The published layout, byte by byte: label byte(s), then 1024 red, 1024 green, 1024 blue bytes."""
    file.parent.mkdir(parents=True, exist_ok=True)
    blob = b"".join(label + bytes(p[0].ravel()) + bytes(p[1].ravel()) + bytes(p[2].ravel())
                    for label, p in zip(labels, pixels, strict=True))
    file.write_bytes(blob)


CIFAR10_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_folder(top: Path, train_each: int = 12, n_test: int = 20) -> dict[str, Any]:
    folder = top / "cifar-10-batches-bin"
    rng = np.random.default_rng(0)
    train_px = cifar_pixels(rng, 5 * train_each)
    train_px[0] = 0
    train_px[0, 0] = 255  # a red record
    train_px[1] = 0
    train_px[1, 1, 0] = 255  # a record with only the top row green
    train_y = np.arange(5 * train_each) % 10
    for b in range(5):
        rows = slice(b * train_each, (b + 1) * train_each)
        write_records(folder / f"data_batch_{b + 1}.bin", [bytes([v]) for v in train_y[rows]], train_px[rows])
    test_px, test_y = cifar_pixels(rng, n_test), (np.arange(n_test) * 3) % 10
    write_records(folder / "test_batch.bin", [bytes([v]) for v in test_y], test_px)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return {"folder": folder, "train_px": train_px, "train_y": train_y, "test_px": test_px, "test_y": test_y}


def cifar10(path: Path, **kw: Any) -> Cifar10Data:
    return Cifar10Data(path=str(path), **{**COMMON, "resolution": 32, "val_fraction": 0.1, **kw})


def test_cifar10_binary_layout(tmp_path):
    w = cifar10_folder(tmp_path / "dl")
    data = cifar10(w["folder"])
    summary = data.prepare(tmp_path / "cache")
    assert data.class_names == CIFAR10_NAMES and data.input_shape == (3, 32, 32)
    x, y, split, _ = cached(summary)
    assert len(x) == 80
    np.testing.assert_array_equal(x[:60], w["train_px"])
    np.testing.assert_array_equal(y[:60], w["train_y"])
    assert (x[0, 0] == 255).all() and (x[0, 1:] == 0).all()  # red plane lands in channel 0
    assert (x[1, 1, 0] == 255).all() and (x[1, 1, 1:] == 0).all() and (x[1, [0, 2]] == 0).all()  # row-major
    # The test split is exactly test_batch.bin's records.
    assert (split[60:] == 2).all() and (split[:60] != 2).all()
    assert summary["splits"] == {"train": 54, "val": 6, "test": 20}
    np.testing.assert_array_equal(x[split == 2], w["test_px"])
    np.testing.assert_array_equal(data.arrays("test")[1], w["test_y"])
    # The folder the archive was unpacked into works too, and is the same data.
    parent = cifar10(tmp_path / "dl")
    assert parent.prepare(tmp_path / "cache")["fingerprint"] == summary["fingerprint"]


def cifar100_folder(top: Path, n_train: int = 40, n_test: int = 20) -> dict[str, Any]:
    folder = top / "cifar-100-binary"
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"folder": folder}
    for name, n in (("train", n_train), ("test", n_test)):
        coarse, fine, px = np.arange(n) % 20, (np.arange(n) * 7 + 3) % 100, cifar_pixels(rng, n)
        write_records(folder / f"{name}.bin", [bytes([c, f]) for c, f in zip(coarse, fine, strict=True)], px)
        out[name] = (coarse, fine, px)
    (folder / "fine_label_names.txt").write_text("".join(f"fine{i}\n" for i in range(100)))
    (folder / "coarse_label_names.txt").write_text("".join(f"coarse{i}\n" for i in range(20)))
    return out


def test_cifar100_fine_and_coarse_labels(tmp_path):
    w = cifar100_folder(tmp_path / "dl")
    fine = Cifar100Data(path=str(tmp_path / "dl"), label="fine", **{**COMMON, "resolution": 32, "val_fraction": 0.1})
    coarse = Cifar100Data(path=str(w["folder"]), label="coarse", **{**COMMON, "resolution": 32, "val_fraction": 0.1})
    sf, sc = fine.prepare(tmp_path / "cache"), coarse.prepare(tmp_path / "cache")
    assert fine.num_classes == 100 and fine.class_names[:2] == ["fine0", "fine1"]
    assert coarse.num_classes == 20 and coarse.class_names[-1] == "coarse19"
    assert sf["fingerprint"] != sc["fingerprint"]
    xf, yf, split, _ = cached(sf)
    _, yc, _, _ = cached(sc)
    np.testing.assert_array_equal(yf, np.concatenate([w["train"][1], w["test"][1]]))
    np.testing.assert_array_equal(yc, np.concatenate([w["train"][0], w["test"][0]]))
    np.testing.assert_array_equal(xf[:40], w["train"][2])  # 2 label bytes skipped, not read as pixels
    np.testing.assert_array_equal(xf[split == 2], w["test"][2])
    assert sf["splits"]["test"] == 20


# ---- 4. splits ----


def grey_folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("a", "b")) -> list[str]:
    """Solid 8x8 grey images, each its own grey level (so an item is known by its pixels)."""
    names = []
    for c, cls in enumerate(classes):
        for i in range(per_class):
            name = f"{cls}/img{i:02d}.png"
            save(root / name, Image.new("L", (8, 8), 10 + 20 * i + c))
            names.append(name)
    return names


def test_seeded_splits_are_reproducible(tmp_path):
    grey_folder(tmp_path / "d", per_class=8)
    a = folder_data(tmp_path / "d", resolution=8, seed=3)
    b = folder_data(tmp_path / "d", resolution=8, seed=3)
    sa, sb = a.prepare(tmp_path / "c1"), b.prepare(tmp_path / "c2")
    assert sa["fingerprint"] == sb["fingerprint"] and sa["splits"] == {"train": 8, "val": 4, "test": 4}
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.arrays(split)[0], b.arrays(split)[0])
        np.testing.assert_array_equal(a.arrays(split)[1], b.arrays(split)[1])
        assert sorted(a.arrays(split)[1].tolist()).count(0) == {"train": 4, "val": 2, "test": 2}[split]  # stratified
    other = folder_data(tmp_path / "d", resolution=8, seed=4)
    so = other.prepare(tmp_path / "c1")
    assert so["fingerprint"] != sa["fingerprint"]
    assert not np.array_equal(cached(so)[2], cached(sa)[2])


@pytest.mark.parametrize("header", [True, False])
def test_split_file_is_obeyed_exactly(tmp_path, header):
    names = grey_folder(tmp_path / "d")
    chosen = {name: ("test" if i % 4 == 0 else "val" if i % 4 == 1 else "train") for i, name in enumerate(names)}
    rows = ["path,split"] if header else []
    rows += [f"{name},{split}" for name, split in reversed(chosen.items())]  # row order does not matter
    (tmp_path / "splits.csv").write_text("\n".join(rows) + "\n")
    data = folder_data(tmp_path / "d", resolution=8, channels=1, splits=str(tmp_path / "splits.csv"))
    summary = data.prepare(tmp_path / "cache")
    assert summary["split_source"] == "file"
    x, _, split, _ = cached(summary)
    codes = {"train": 0, "val": 1, "test": 2}
    np.testing.assert_array_equal(split, [codes[chosen[n]] for n in order(names)])
    wanted = sorted(10 + 20 * int(n[-6:-4]) + (n[0] == "b") for n in names if chosen[n] == "test")
    assert sorted(x[split == 2, 0, 0, 0].tolist()) == wanted


def test_split_file_for_npz_uses_row_numbers(tmp_path):
    x = np.arange(12, dtype=np.uint8)[:, None, None].repeat(8, 1).repeat(8, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 2)
    rows = [f"{i},{'test' if i in (0, 5) else 'val' if i in (1, 4) else 'train'}" for i in range(12)]
    (tmp_path / "s.csv").write_text("\n".join(rows))
    data = npz_data(tmp_path / "d.npz", splits=str(tmp_path / "s.csv"))
    cx, _, split, _ = cached(data.prepare(tmp_path / "cache"))
    assert cx[split == 2, 0, 0, 0].tolist() == [0, 5] and cx[split == 1, 0, 0, 0].tolist() == [1, 4]


# ---- 5. fingerprint ----


def test_fingerprint_follows_content_and_split_only(tmp_path):
    names = grey_folder(tmp_path / "one")
    for name in reversed(names):  # the same files, created in the other order
        (tmp_path / "two" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "two" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    base = folder_data(tmp_path / "one", resolution=8).prepare(tmp_path / "cache")
    assert folder_data(tmp_path / "two", resolution=8).prepare(tmp_path / "cache")["fingerprint"] == base["fingerprint"]
    # Ignored files do not count.
    (tmp_path / "one" / "a" / "notes.txt").write_text("x")
    save(tmp_path / "one" / "a" / ".hidden.png", noise(0))
    assert folder_data(tmp_path / "one", resolution=8).prepare(tmp_path / "cache")["fingerprint"] == base["fingerprint"]
    # Deleting the cache rebuilds the same thing.
    old_x = cached(base)[0]
    for file in Path(base["cache"]["path"]).iterdir():
        file.unlink()
    Path(base["cache"]["path"]).rmdir()
    again = folder_data(tmp_path / "one", resolution=8).prepare(tmp_path / "cache")
    assert again["fingerprint"] == base["fingerprint"] and again["cache"]["reused"] is False
    np.testing.assert_array_equal(cached(again)[0], old_x)
    # The split is part of it.
    assert folder_data(tmp_path / "one", resolution=8, seed=9).prepare(tmp_path / "c")["fingerprint"] != base["fingerprint"]


def test_fingerprint_changes_with_one_byte_or_a_moved_file(tmp_path):
    def fingerprint(root: Path) -> str:
        return folder_data(root, resolution=8).prepare(tmp_path / "cache")["fingerprint"]

    for cls in "ab":
        for i in range(4):
            save(tmp_path / "d" / cls / f"{i}.bmp", noise(ord(cls) * 10 + i))
    before = fingerprint(tmp_path / "d")
    file = tmp_path / "d" / "b" / "2.bmp"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # one pixel byte (8 px x 3 bytes: rows have no padding)
    file.write_bytes(bytes(data))
    changed = fingerprint(tmp_path / "d")
    assert changed != before
    file.rename(tmp_path / "d" / "a" / "2b.bmp")
    save(tmp_path / "d" / "b" / "9.bmp", noise(99))  # b keeps 4 items: same split sizes
    moved = fingerprint(tmp_path / "d")
    assert moved not in (before, changed)


def test_pinned_fingerprint_refuses_other_data(tmp_path):
    grey_folder(tmp_path / "d")
    right = folder_data(tmp_path / "d", resolution=8).prepare(tmp_path / "cache")["fingerprint"]
    assert folder_data(tmp_path / "d", resolution=8, fingerprint=right).prepare(tmp_path / "cache")["fingerprint"] == right
    wrong = "0123456789abcdef" if right != "0123456789abcdef" else "fedcba9876543210"
    with pytest.raises(DataError, match="not the data this run was made with") as info:
        folder_data(tmp_path / "d", resolution=8, fingerprint=wrong).prepare(tmp_path / "other")
    assert "\n" not in str(info.value) and right in str(info.value) and wrong in str(info.value)
    assert not (tmp_path / "other").exists()


# ---- 6. the cache ----


def test_cache_is_reused_not_decoded_again(tmp_path, monkeypatch):
    grey_folder(tmp_path / "d")
    first = folder_data(tmp_path / "d", resolution=8)
    s1 = first.prepare(tmp_path / "cache")
    assert s1["cache"]["reused"] is False

    def no_decoding(*args: Any, **kw: Any) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folder_module, "decode_file", no_decoding)
    second = folder_data(tmp_path / "d", resolution=8)
    s2 = second.prepare(tmp_path / "cache")
    assert s2["cache"]["reused"] is True and s2["cache"]["path"] == s1["cache"]["path"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(s1["cache"]["path"]).name]
    blob = pickle.dumps(first)
    assert len(blob) < 10_000  # the recipe and where its cache is, not the pixels
    clone = pickle.loads(blob)
    assert clone.fingerprint == first.fingerprint
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(clone.arrays(split)[0], first.arrays(split)[0])
        np.testing.assert_array_equal(clone.arrays(split)[1], second.arrays(split)[1])
    # Another resolution is another cache, which needs decoding.
    with pytest.raises(AssertionError, match="decoded again"):
        folder_data(tmp_path / "d", resolution=9).prepare(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(s1["cache"]["path"]).name]


def _truncate_x(folder: Path) -> None:
    file = folder / "x.npy"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _mean_text(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["mean"] = "0.5"
    (folder / "meta.json").write_text(json.dumps(meta))


def _labels_out_of_range(folder: Path) -> None:
    y = np.load(folder / "y.npy")
    y[0] = 7
    np.save(folder / "y.npy", y)


def _meta_not_json(folder: Path) -> None:
    (folder / "meta.json").write_text("{")


@pytest.mark.parametrize("damage", [_truncate_x, _mean_text, _labels_out_of_range, _meta_not_json])
def test_damaged_cache_is_refused_naming_its_folder(tmp_path, damage):
    grey_folder(tmp_path / "d")
    folder = Path(folder_data(tmp_path / "d", resolution=8).prepare(tmp_path / "cache")["cache"]["path"])
    damage(folder)
    with pytest.raises(DataError, match="damaged") as info:
        folder_data(tmp_path / "d", resolution=8).prepare(tmp_path / "cache")
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_parallel_decode_writes_the_same_cache(tmp_path, monkeypatch):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in range(300):  # two chunks of the worker split (256 items each at most)
        size = (int(rng.integers(8, 20)), int(rng.integers(8, 20)))
        save(root / "abc"[i % 3] / f"{i:03d}.png", noise(i, size))
    serial = folder_data(root, resolution=8, decode_workers=1).prepare(tmp_path / "serial")
    monkeypatch.setattr(image_folder_module, "PARALLEL_FROM", 10)
    parallel = folder_data(root, resolution=8, decode_workers=2).prepare(tmp_path / "parallel")
    # Two decode_worker processes wrote their shares straight into the cache file.
    assert (serial["cache"]["decode_workers"], parallel["cache"]["decode_workers"]) == (1, 2)
    assert parallel["fingerprint"] == serial["fingerprint"]
    folders = [Path(s["cache"]["path"]) for s in (serial, parallel)]
    for name in ("x.npy", "y.npy", "split.npy"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_parallel_decode_names_a_bad_file_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for i in range(40):
        save(root / "ab"[i % 2] / f"{i:03d}.png", noise(i, (12, 12)))
    bad = root / "b" / "031.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a header and half a chunk: decodes only partly
    monkeypatch.setattr(image_folder_module, "PARALLEL_FROM", 10)
    refused(folder_data(root, resolution=8, decode_workers=2), tmp_path / "cache", "b/031.png")


def test_parallel_decode_from_a_script_without_a_main_guard(tmp_path):
    # multiprocessing's spawn would run this script again in every child (and prepare again, forever);
    # the decode workers are plain `python -m` processes, so it runs once.
    import subprocess
    import sys

    root = tmp_path / "d"
    for i in range(24):
        save(root / "ab"[i % 2] / f"{i:03d}.png", noise(i, (10, 10)))
    script = tmp_path / "user_script.py"
    script.write_text(
        "from hwnas.evaluators.data import ImageFolderData, image_folder\n"
        "image_folder.PARALLEL_FROM = 1\n"
        f"d = ImageFolderData(path={str(root)!r}, resolution=8, channels=None, val_fraction=0.2, test_fraction=0.2,"
        " batch_size=8, seed=0, decode_workers=2)\n"
        f"print('prepared', d.prepare({str(tmp_path / 'cache')!r})['cache']['decode_workers'])\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("prepared") == 1 and proc.stdout.strip().endswith("2"), proc.stdout


# ---- 7. augmentation ----


@pytest.fixture
def noise_npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "n.npz", x=rng.integers(0, 256, (48, 12, 12, 3), dtype=np.uint8), y=np.arange(48) % 3)
    return tmp_path / "n.npz"


def batches(data: NpzData, split: str, *, shuffle: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in data.loader(split, shuffle=shuffle, seed=seed)], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_augmentation_is_seeded_and_training_only(tmp_path, noise_npz):
    plain = npz_data(noise_npz)
    aug = npz_data(noise_npz, augment=True, crop_padding=4, hflip=True)
    plain.prepare(tmp_path / "cache")
    aug.prepare(tmp_path / "cache")
    x0, y0 = batches(plain, "train", shuffle=True, seed=3)
    x1, y1 = batches(aug, "train", shuffle=True, seed=3)
    np.testing.assert_array_equal(y0, y1)  # same order: only the pixels are augmented
    assert x0.shape == x1.shape
    changed = [not np.array_equal(a, b) for a, b in zip(x0, x1, strict=True)]
    assert sum(changed) > len(changed) // 2
    x2, _ = batches(aug, "train", shuffle=True, seed=3)
    np.testing.assert_array_equal(x1, x2)
    x3, _ = batches(aug, "train", shuffle=True, seed=4)
    assert not np.array_equal(x1, x3)
    x3_plain, _ = batches(plain, "train", shuffle=True, seed=4)
    assert sum(not np.array_equal(a, b) for a, b in zip(x3, x3_plain, strict=True)) > len(x3) // 2
    for split in ("val", "test"):
        xe, ye = aug.arrays(split)
        xs, ys = batches(aug, split, shuffle=False)
        np.testing.assert_array_equal(xs, xe)
        np.testing.assert_array_equal(ys, ye)
        # Even a shuffled evaluation loader hands out the items as they are.
        xs, _ = batches(aug, split, shuffle=True, seed=1)
        rows = {r.tobytes() for r in xe}
        assert all(r.tobytes() in rows for r in xs)


def test_hflip_only_mirrors_exactly(tmp_path, noise_npz):
    plain = npz_data(noise_npz)
    flip = npz_data(noise_npz, augment=True, crop_padding=0, hflip=True)
    plain.prepare(tmp_path / "cache")
    flip.prepare(tmp_path / "cache")
    x0, _ = batches(plain, "train", shuffle=True, seed=5)
    x1, _ = batches(flip, "train", shuffle=True, seed=5)
    mirrored = 0
    for a, b in zip(x0, x1, strict=True):
        if np.array_equal(a, b):
            continue
        np.testing.assert_array_equal(b, a[:, :, ::-1])
        mirrored += 1
    assert 0 < mirrored < len(x0)


# ---- 8. bad data ----


def valid_folder(root: Path) -> None:
    for cls in "ab":
        for i in range(3):
            save(root / cls / f"ok{i}.png", noise(ord(cls) * 10 + i))


def truncated(root: Path, name: str, fmt: str) -> None:
    buf = io.BytesIO()
    noise(0, (64, 64)).save(buf, format=fmt)
    (root / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _missing(root: Path) -> Path:
    return root / "nowhere"


def _empty(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _single_class(root: Path) -> Path:
    save(root / "d" / "only" / "x.png", noise(0))
    save(root / "d" / "only" / "y.png", noise(1))
    return root / "d"


def _class_without_images(root: Path) -> Path:
    valid_folder(root / "d")
    (root / "d" / "c").mkdir()
    (root / "d" / "c" / "README.txt").write_text("no images yet")
    save(root / "d" / "c" / ".hidden.png", noise(0))
    return root / "d"


def _truncated_png(root: Path) -> Path:
    valid_folder(root / "d")
    truncated(root / "d", "a/bad.png", "PNG")
    return root / "d"


def _truncated_jpeg(root: Path) -> Path:
    valid_folder(root / "d")
    truncated(root / "d", "b/bad.jpg", "JPEG")
    return root / "d"


def _not_an_image(root: Path) -> Path:
    valid_folder(root / "d")
    (root / "d" / "b" / "fake.webp").write_text("this is not a picture")
    return root / "d"


def _empty_file(root: Path) -> Path:
    valid_folder(root / "d")
    (root / "d" / "a" / "empty.bmp").write_bytes(b"")
    return root / "d"


def _float_mode(root: Path) -> Path:
    # PNG cannot hold 32-bit float, but Pillow opens files by their content, not their name: a float
    # TIFF named .png is an image with an allowed extension whose mode ('F') cannot be reconciled.
    valid_folder(root / "d")
    save(root / "d" / "a" / "float.png", Image.fromarray(np.zeros((8, 8), dtype=np.float32)), format="TIFF")
    assert Image.open(root / "d" / "a" / "float.png").mode == "F"
    return root / "d"


@pytest.mark.parametrize(
    "make, expected",
    [
        (_missing, ["nowhere", "not a folder"]),
        (_empty, ["empty", "no class sub-folders"]),
        (_single_class, ["'only'", "single class"]),
        (_class_without_images, ["'c'", "holds no images"]),
        (_truncated_png, ["'a/bad.png'"]),
        (_truncated_jpeg, ["'b/bad.jpg'"]),
        (_not_an_image, ["'b/fake.webp'"]),
        (_empty_file, ["'a/empty.bmp'", "empty file"]),
        (_float_mode, ["'a/float.png'", "mode 'F'"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_image_folders_are_refused(tmp_path, make, expected):
    refused(folder_data(make(tmp_path)), tmp_path / "cache", *expected)


def _npz_ok(**extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"x": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), "y": np.arange(20) % 3, **extra}


def _npz_object(path: Path) -> None:
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((8, 8)), np.zeros((9, 9))
    np.savez(path, x=ragged, y=np.arange(2))  # allow_pickle is on when writing: a pickle inside the archive


NPZ_CASES = [
    ("out_of_range", _npz_ok(y=np.arange(20) % 4, classes=np.array(["a", "b", "c"])), ["y: label 3 is out of range"]),
    ("negative", _npz_ok(y=np.arange(20) % 3 - 1), ["y: label -1 is negative"]),
    ("float_labels", _npz_ok(y=np.arange(20) / 2), ["y: labels are float64"]),
    ("length", _npz_ok(y=np.arange(19) % 3), ["x/y: 20 images but 19 labels"]),
    ("object_array", None, ["bad.npz", "object array"]),
    ("missing_y", {"x": _npz_ok()["x"]}, ["bad.npz", "no array 'y'"]),
    ("unknown_key", _npz_ok(labels=np.arange(20)), ["bad.npz", "unknown array 'labels'"]),
    ("nan", _npz_ok(x=np.where(np.eye(8)[None] > 0, np.nan, 1.0) * np.ones((20, 1, 1))), ["x: holds NaN"]),
    ("x_val_alone", _npz_ok(x_val=_npz_ok()["x"]), ["y_val: missing"]),
    ("five_channels", _npz_ok(x=np.zeros((20, 5, 8, 8), np.uint8)), ["x: shape (20, 5, 8, 8)"]),
    ("int16", _npz_ok(x_test=np.zeros((4, 8, 8), np.int16), y_test=np.arange(4) % 3), ["x_test: dtype int16"]),
    ("val_shape", _npz_ok(x_val=np.zeros((4, 9, 9), np.uint8), y_val=np.arange(4) % 3), ["x, x_val, x_test: shapes"]),
    ("one_class_name", _npz_ok(classes=np.array(["a"])), ["classes:"]),
    ("not_npz", b"PK\x03\x04 not really", ["bad.npz", "not a readable .npz"]),
    ("no_file", "absent", ["bad.npz", "not a file"]),
]


@pytest.mark.parametrize("content, expected", [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES])
def test_bad_npz_is_refused(tmp_path, content, expected):
    path = tmp_path / "bad.npz"
    if content is None:
        _npz_object(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    refused(npz_data(path, resolution=8), tmp_path / "cache", *expected)


def _short_record(top: Path) -> Path:
    w = cifar10_folder(top)
    file = w["folder"] / "data_batch_2.bin"
    file.write_bytes(file.read_bytes()[:-1])
    return w["folder"]


def _no_batch_3(top: Path) -> Path:
    w = cifar10_folder(top)
    (w["folder"] / "data_batch_3.bin").unlink()
    return w["folder"]


def _no_batch_3_from_parent(top: Path) -> Path:
    _no_batch_3(top)
    return top


def _nine_names(top: Path) -> Path:
    w = cifar10_folder(top)
    (w["folder"] / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES[:9]))
    return w["folder"]


def _label_byte_10(top: Path) -> Path:
    w = cifar10_folder(top)
    file = w["folder"] / "test_batch.bin"
    data = bytearray(file.read_bytes())
    data[3073] = 10  # the second record's label byte
    file.write_bytes(bytes(data))
    return w["folder"]


@pytest.mark.parametrize(
    "make, expected",
    [
        (_short_record, ["data_batch_2.bin", "3073-byte records"]),
        (_no_batch_3, ["has no data_batch_3.bin"]),
        (_no_batch_3_from_parent, ["has no data_batch_3.bin"]),
        (_nine_names, ["batches.meta.txt names 9 classes"]),
        (_label_byte_10, ["test_batch.bin record 1 has label 10", "allowed: 0..9"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_cifar10_is_refused(tmp_path, make, expected):
    refused(cifar10(make(tmp_path / "dl")), tmp_path / "cache", *expected)


def test_bad_cifar100_record_size_is_refused(tmp_path):
    w = cifar100_folder(tmp_path / "dl")
    (w["folder"] / "test.bin").write_bytes((w["folder"] / "test.bin").read_bytes() + b"\0")
    data = Cifar100Data(path=str(w["folder"]), **{**COMMON, "resolution": 32})
    refused(data, tmp_path / "cache", "test.bin", "3074-byte records")


SPLIT_CASES = [
    ("unknown_path", lambda rows: [*rows, "a/nope.png,train"], ["splits.csv", "'a/nope.png' is not an item"]),
    ("missing_item", lambda rows: rows[:-1], ["splits.csv", "does not list 1 item(s)", "'b/img05.png'"]),
    ("bad_split", lambda rows: [rows[0].replace("train", "validation"), *rows[1:]], ["splits.csv", "'validation' is unknown"]),
    ("duplicate", lambda rows: [*rows, rows[3]], ["splits.csv", "listed twice"]),
    ("three_fields", lambda rows: [*rows[:-1], rows[-1] + ",x"], ["splits.csv", "3 fields"]),
    ("empty_split", lambda rows: [r.replace(",val", ",train") for r in rows], ["splits.csv", "no item in val"]),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES])
def test_bad_split_file_is_refused(tmp_path, edit, expected):
    names = grey_folder(tmp_path / "d")
    rows = [f"{n},{('train', 'val', 'test')[i % 3]}" for i, n in enumerate(names)]
    (tmp_path / "splits.csv").write_text("path,split\n" + "\n".join(edit(rows)) + "\n")
    refused(folder_data(tmp_path / "d", resolution=8, splits=str(tmp_path / "splits.csv")), tmp_path / "cache", *expected)


def test_missing_split_file_is_refused(tmp_path):
    grey_folder(tmp_path / "d")
    refused(folder_data(tmp_path / "d", resolution=8, splits=str(tmp_path / "gone.csv")), tmp_path / "cache", "gone.csv")


def test_check_shape_sees_the_input_before_anything_is_decoded(tmp_path, monkeypatch):
    # The driver lets the space refuse a resolution it cannot hold before a large folder is decoded.
    root = tmp_path / "d"
    for i in range(8):
        save(root / "ab"[i % 2] / f"{i}.png", noise(i, (10, 10)))
    monkeypatch.setattr(image_folder_module, "decode_file", lambda *a: pytest.fail("decoded before the shape check"))
    seen: list[tuple[int, int, int]] = []

    def refuse(shape: tuple[int, int, int]) -> None:
        seen.append(shape)
        raise ValueError("space.n_stages: does not fit")

    with pytest.raises(ValueError, match="n_stages"):
        folder_data(root, resolution=12).prepare(tmp_path / "cache", check_shape=refuse)
    assert seen == [(3, 12, 12)] and not (tmp_path / "cache").exists()
