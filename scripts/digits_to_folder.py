"""Write scikit-learn's bundled digits out as an image folder: OUT/<class>/<index>.png.

    .venv/bin/python -m hwnas.scripts.digits_to_folder OUT [--size 8] [--rgb] [--seed 0]

The 1,797 8x8 images of `sklearn.datasets.load_digits` (values 0..16; shipped with scikit-learn,
nothing is downloaded) become one PNG each, in one sub-folder per class named `0`..`9` (the
ImageFolder convention), named by the image's index in `load_digits` (zero-padded to 4 digits, so
that sorted names are index order). A pixel is round(value * 255 / 16), grayscale (mode L).

`--size N` upscales to NxN with NEAREST: each source pixel becomes a block of one value, so the
files hold exactly the information of the 8x8 originals and no interpolated values the data never
had; a loader that wants smooth inputs can resize with its own filter. Sizes below 8 are refused
(they would drop strokes).

`--rgb` tints each image with its own colour (mode RGB): a hue drawn uniformly, saturation in
[0.6, 1] and full value, seeded by `--seed`, multiplied into the grayscale image, so strokes take
the colour and the background stays black. The colour is drawn independently of the class, so it
is a nuisance a model must ignore: the folder holds real colour images (channels differ) whose
labels are still the digits'. `--seed` only matters with `--rgb`.

OUT must not exist or be an empty folder (else: one line on stderr, exit status 2). The folder is
written under a temporary name beside OUT and renamed into place at the end, so a run that fails
leaves no half-written dataset behind.
"""

from __future__ import annotations

import argparse
import colorsys
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hwnas.scripts.new_folder import refusal, written_atomically

NATIVE = 8  # load_digits' images are 8x8
MAX_VALUE = 16  # ... with integer values 0..16


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--size", type=int, default=NATIVE, help="side in pixels, >= 8, upscaled with NEAREST (default: 8)")
    p.add_argument("--rgb", action="store_true", help="tint each image with a seeded random colour (mode RGB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --rgb colours (default: 0)")
    args = p.parse_args(argv)
    if args.size < NATIVE:
        p.error(f"--size must be at least {NATIVE} (the native size), got {args.size}")
    return args


def to_gray(image: np.ndarray) -> np.ndarray:
    """An 8x8 image of values 0..16 as uint8 0..255."""
    return np.rint(image * (255.0 / MAX_VALUE)).astype(np.uint8)


def tint_colours(n: int, seed: int) -> np.ndarray:
    """n RGB multipliers in [0, 1], one per image: random hue, saturated enough to be visibly coloured."""
    rng = np.random.default_rng(seed)
    hues = rng.uniform(0.0, 1.0, n)
    saturations = rng.uniform(0.6, 1.0, n)
    return np.array([colorsys.hsv_to_rgb(h, s, 1.0) for h, s in zip(hues, saturations, strict=True)])


def write_folder(folder: Path, images: np.ndarray, labels: np.ndarray, size: int, colours: np.ndarray | None) -> None:
    for c in np.unique(labels):
        (folder / str(c)).mkdir()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        gray = to_gray(image)
        if colours is None:
            pixels = gray
        else:  # tint the 8x8 values, then scale: the same as scaling first (NEAREST copies values)
            pixels = np.rint(gray[:, :, None] * colours[i]).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L" if colours is None else "RGB")
        if size != NATIVE:
            img = img.resize((size, size), Image.Resampling.NEAREST)
        img.save(folder / str(label) / f"{i:04d}.png")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(os.path.abspath(args.out))  # "." or "x/.." have a real name and parent
    why = refusal(out)
    if why is not None:
        print(f"digits_to_folder: {why}", file=sys.stderr)
        return 2
    # Imported here, not at the top: it takes a second, and a refusal should be instant.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    colours = tint_colours(len(images), args.seed) if args.rgb else None

    with written_atomically(out) as tmp:
        write_folder(tmp, images, labels, args.size, colours)
    kind = "RGB" if args.rgb else "grayscale"
    print(f"wrote {len(images)} images ({args.size}x{args.size} {kind} PNG) in {len(np.unique(labels))} classes to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
