"""Build an RGB image-folder classification dataset from real photographs that ship with installed packages.

    .venv/bin/python -m hwnas.scripts.make_photo_folder OUT [--per-class 300] [--size 128] [--seed 0] \
        [--format jpg|png]

Nothing is downloaded: the photographs are files inside packages the project already depends on.
Looked for when this script was written (scikit-learn 1.9, matplotlib 3.11; scikit-image, whose
`skimage.data` has more, is not a dependency and is not used):

    china         sklearn/datasets/images/china.jpg                  640x427  (sklearn.datasets.load_sample_images)
    flower        sklearn/datasets/images/flower.jpg                 640x427  (idem)
    grace_hopper  matplotlib/mpl-data/sample_data/grace_hopper.jpg   512x600  (matplotlib.cbook.get_sample_data)

matplotlib's other sample images (logo2.png, Minduka_Present_Blue_Pack.png) are drawings, not
photographs; scipy.datasets' `face` and `ascent` are downloaded on first use, so they are not on the
machine. The set is fixed: a missing photograph is an error, not a smaller dataset.

Classes: three photographs are too few, so each is cut into a 2x2 grid of regions and each region
is a class, 12 in all, named `<photo>_<top|bottom>_<left|right>` (e.g. `china_top_left`). Regions of
one photograph share colours, light and texture, so the task is learnable (regions differ in
content: sky, roof, petals, face, uniform...) but not trivial for a small CNN: small crops of similar
regions (the two bottom quadrants of grace_hopper, the petals of flower) are hard to tell apart.
Measured when written: a 3-layer CNN (16-32-64 channels, ~25k weights) trained 15 epochs on 80% of
a `--per-class 300 --size 64` folder read at 32x32 scored 88% on the other 20% (chance: 8%).

Samples: a square crop of random side (15-60% of the region's shorter side) at a random position
inside the region, resized to `--size` x `--size` with BICUBIC (Pillow filters the crop's pixels when
it shrinks), flipped left-right with probability 1/2, then brightness and contrast each scaled by a
factor in [0.8, 1.2] (PIL.ImageEnhance). Saved as JPEG quality 90 (`--format jpg`, the default) or
PNG, as OUT/<class>/<index>.<ext>. Every class draws from its own generator seeded by
(--seed, class number), so a run is deterministic given the seed (same files byte for byte with
the same Pillow), and the first k images of a class do not depend on `--per-class`.

OUT/SOURCE.txt (a plain file at the top, beside the class folders) records the photographs (path,
size, SHA-256, package version), the regions and this recipe; a loader must skip files at the top
(ImageFolder does: its classes are the sub-folders). OUT must not exist or be an empty
folder (else: one line on stderr, exit status 2); the folder is written under a temporary name and
renamed into place at the end, so a failed run leaves no half-written dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageEnhance

from hwnas.scripts.new_folder import refusal, written_atomically

# (name, distribution, import package, path inside the package). Found with find_spec rather than by
# importing: importing sklearn (and scipy behind it) only to learn a file path costs a second a run.
PHOTOS = (
    ("china", "scikit-learn", "sklearn", "datasets/images/china.jpg"),
    ("flower", "scikit-learn", "sklearn", "datasets/images/flower.jpg"),
    ("grace_hopper", "matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
ROWS = ("top", "bottom")
COLS = ("left", "right")
CROP_FRACTION = (0.15, 0.60)  # crop side, as a fraction of the region's shorter side
MIN_CROP = 8  # pixels: never upscale a crop smaller than this
JITTER = (0.8, 1.2)  # brightness and contrast factors
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Photo:
    name: str
    path: Path
    package: str  # "scikit-learn 1.9.1"


@dataclass(frozen=True)
class Region:
    name: str  # the class folder's name
    photo: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in the photograph's pixels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--per-class", type=int, default=300, help="images per class (default: 300)")
    p.add_argument("--size", type=int, default=128, help="side of the saved images in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and jitter (default: 0)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="JPEG quality 90, or PNG (default: jpg)")
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.error(f"--per-class must be at least 1, got {args.per_class}")
    if args.size < MIN_CROP:
        p.error(f"--size must be at least {MIN_CROP}, got {args.size}")
    return args


def find_photos() -> list[Photo]:
    """The bundled photographs, all of them; FileNotFoundError names the first one missing."""
    photos = []
    for name, dist, package, inner in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"photograph {name!r} needs the package {dist}, which is not installed")
        path = Path(spec.origin).parent / inner
        if not path.is_file():
            raise FileNotFoundError(f"photograph {name!r} is not in {dist} ({path} is missing)")
        photos.append(Photo(name, path, f"{dist} {importlib.metadata.version(dist)}"))
    return photos


def regions(name: str, width: int, height: int) -> list[Region]:
    """The 2x2 grid of a photograph, row by row."""
    xs, ys = (0, width // 2, width), (0, height // 2, height)
    return [
        Region(f"{name}_{row}_{col}", name, (xs[c], ys[r], xs[c + 1], ys[r + 1]))
        for r, row in enumerate(ROWS)
        for c, col in enumerate(COLS)
    ]


def sample(photo: Image.Image, box: tuple[int, int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One augmented crop of `photo` inside `box`. The draws are made in a fixed order: the seed's contract."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    side = max(MIN_CROP, round(rng.uniform(*CROP_FRACTION) * min(width, height)))
    x = left + int(rng.integers(0, width - side + 1))
    y = top + int(rng.integers(0, height - side + 1))
    flip = rng.random() < 0.5
    brightness, contrast = rng.uniform(*JITTER), rng.uniform(*JITTER)
    img = photo.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + side, y + side))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(brightness)
    return ImageEnhance.Contrast(img).enhance(contrast)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_text(photos: list[Photo], sizes: dict[str, tuple[int, int]], classes: list[Region], args: argparse.Namespace) -> str:
    lines = [
        "An RGB image-folder classification dataset built from real photographs bundled in installed packages",
        "by scripts/make_photo_folder.py (python -m hwnas.scripts.make_photo_folder); nothing was downloaded.",
        "",
        # No output path here: the same settings give the same SOURCE.txt wherever the folder is written.
        "Made with: python -m hwnas.scripts.make_photo_folder OUT "
        + shlex.join(["--per-class", str(args.per_class), "--size", str(args.size), "--seed", str(args.seed), "--format", args.format])
        + f"  (Pillow {PIL.__version__})",
        "",
        "Photographs (name, path, width x height, sha256, package):",
    ]
    for p in photos:
        w, h = sizes[p.name]
        lines.append(f"  {p.name}  {p.path}  {w}x{h}  {sha256(p.path)}  {p.package}")
    lines += ["", "Classes (folder: photograph, region box left,top,right,bottom in its pixels):"]
    lines += [f"  {c.name}: {c.photo} {','.join(map(str, c.box))}" for c in classes]
    lo, hi = CROP_FRACTION
    jlo, jhi = JITTER
    ext = f"JPEG quality {JPEG_QUALITY}" if args.format == "jpg" else "PNG"
    lines += [
        "",
        "Recipe: each photograph is cut into a 2x2 grid of regions; each region is a class. A sample is a square",
        f"crop of side uniform in [{lo:.0%}, {hi:.0%}] of the region's shorter side (at least {MIN_CROP} px), at a",
        f"uniform random position inside the region, resized to {args.size}x{args.size} with BICUBIC, flipped",
        f"left-right with probability 1/2, then brightness and contrast each scaled by a factor uniform in [{jlo}, {jhi}]",
        f"(PIL.ImageEnhance); saved as {ext}. Class number k (in the order above) draws from",
        f"numpy.random.default_rng([{args.seed}, k]).",
        "",
    ]
    return "\n".join(lines)


def write_folder(folder: Path, photos: list[Photo], args: argparse.Namespace) -> tuple[list[Region], int]:
    images: dict[str, Image.Image] = {}
    for p in photos:
        with Image.open(p.path) as f:
            images[p.name] = f.convert("RGB")  # decoded once, in memory
    classes = [r for p in photos for r in regions(p.name, *images[p.name].size)]
    ext, fmt = (".jpg", "JPEG") if args.format == "jpg" else (".png", "PNG")
    save_options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    width = max(4, len(str(args.per_class - 1)))
    for k, region in enumerate(classes):
        rng = np.random.default_rng([args.seed, k])
        (folder / region.name).mkdir()
        for i in range(args.per_class):
            img = sample(images[region.photo], region.box, args.size, rng)
            img.save(folder / region.name / f"{i:0{width}d}{ext}", format=fmt, **save_options)
    sizes = {name: img.size for name, img in images.items()}
    (folder / "SOURCE.txt").write_text(source_text(photos, sizes, classes, args))
    return classes, len(classes) * args.per_class


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(os.path.abspath(args.out))  # "." or "x/.." have a real name and parent
    why = refusal(out)
    if why is not None:
        print(f"make_photo_folder: {why}", file=sys.stderr)
        return 2
    try:
        photos = find_photos()
    except FileNotFoundError as e:
        print(f"make_photo_folder: {e}", file=sys.stderr)
        return 1

    with written_atomically(out) as tmp:
        classes, n = write_folder(tmp, photos, args)
    print(
        f"wrote {n} images ({args.per_class} per class, {args.size}x{args.size} RGB {args.format}) in {len(classes)} "
        f"classes to {out}, from {len(photos)} photographs: {', '.join(str(p.path) for p in photos)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
