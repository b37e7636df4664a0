"""Own data end to end: an image folder, an .npz, CIFAR-10 binaries and a custom LightningDataModule,
each through the real `hwnas` command (subprocess), to an exported model whose card and ONNX input
match the data; resume and hwnas-export refuse changed data; bad data is refused before anything.

Every data set here is written by the test (nothing is downloaded). The sweeps are as small as a
sweep gets (smoke space, 2 trials, one epoch, width 8, 3 timed latency runs); the image folder runs
with Ray and MLflow in full, the other sources in one parametrized test (also on Ray).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import TESTS, hwnas, hwnas_export, mlflow_runs, output_of, read_jsonl
from omegaconf import OmegaConf

# tests/ on PYTHONPATH: the driver imports own_datamodule (plugins=[own_datamodule]), and Ray's
# workers inherit it from the driver.
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}

# The smoke experiment, smaller still: what a sweep must do, in as few seconds as it can.
TINY = [
    "experiment=smoke", "n_trials=2", "seed=0", "space.widths=[8]", "evaluator.epochs=1",
    "evaluator.finetune_epochs=1", "evaluator.calibration_samples=16", "hardware.warmup=1", "hardware.repeats=3",
]

IMAGE_CLASSES = ["discs", "squares"]  # sorted: the order hwnas gives them (ImageFolder convention)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NPZ_CLASSES = ["dark_left", "bright_right", "stripes"]
MODULE_CLASSES = ["red", "green", "blue"]  # own_datamodule.CLASSES (not imported: it would load torch at collection)


# ---- data written by the tests ----


def write_image_folder(root: Path, per_class: int = 40, seed: int = 0) -> dict[str, list[Path]]:
    """Two learnable classes (a red disc, a blue square, on noise), as a mix of RGB and grey ("L")
    images, PNG and JPEG, of several sizes (square and not): the folder a researcher might have."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {}
    for label, cls in enumerate(IMAGE_CLASSES):
        (root / cls).mkdir(parents=True)
        files[cls] = []
        for i in range(per_class):
            h, w = [(24, 24), (32, 28), (30, 36)][i % 3]
            img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
            rows, cols = np.mgrid[0:h, 0:w]
            cy, cx, r = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3), rng.uniform(5, 8)
            if label == 0:
                mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= r**2
                colour = (230, 40, 40)
            else:
                mask = (abs(rows - cy) <= r) & (abs(cols - cx) <= r)
                colour = (40, 60, 230)
            img[mask] = colour
            pil = Image.fromarray(img, "RGB")
            if i % 5 < 2:
                pil = pil.convert("L")  # grey PNGs and JPEGs among colour ones: read as 3 equal channels
            path = root / cls / (f"{i:03d}.png" if i % 2 == 0 else f"{i:03d}.jpg")
            pil.save(path, quality=90) if path.suffix == ".jpg" else pil.save(path)
            files[cls].append(path)
    return files


def write_npz(path: Path, seed: int = 0) -> None:
    """uint8 N×H×W×3 at 20×20 (resolution: null keeps it), with its own test split and class names."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % len(NPZ_CLASSES)
        x = rng.integers(0, 50, size=(n, 20, 20, 3)).astype(np.uint8)
        x[y == 0, :, :10] += 100
        x[y == 1, :, 10:] += 200
        x[y == 2, ::4] = 255
        return x, y.astype(np.int64)

    x, y = make(120)
    x_test, y_test = make(30)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test, classes=np.array(NPZ_CLASSES))


def write_cifar10(root: Path, records: int = 40, seed: int = 0) -> Path:
    """The published CIFAR-10 binary layout, byte by byte: cifar-10-batches-bin/data_batch_1..5.bin and
    test_batch.bin, each a run of 3073-byte records (1 label byte, then 1024 red, 1024 green, 1024 blue
    bytes, rows of 32), and batches.meta.txt naming the classes. Returns the folder above it."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for n, name in enumerate(names):
        out = bytearray()
        for r in range(records):
            label = (n * records + r) % 10
            planes = rng.integers(0, 80, size=(3, 32, 32)).astype(np.uint8)
            planes[label % 3, (label // 3) * 8 : (label // 3) * 8 + 8, :] = 250  # a bright band: learnable
            out.append(label)
            out += planes.tobytes()  # C order: red plane, green plane, blue plane, each row-major
        assert len(out) == records * 3073
        (folder / name).write_bytes(bytes(out))
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")  # as published: a blank line at the end
    return root


COARSE_NAMES = [f"super{i}" for i in range(20)]


def write_cifar100(root: Path, train: int = 120, test: int = 40, seed: int = 0) -> Path:
    """The published CIFAR-100 binary layout: cifar-100-binary/train.bin and test.bin, 3074-byte records
    (coarse label byte, fine label byte, then the red, green and blue planes), and the two names files.
    Only 4 coarse classes occur (bright bands, learnable); the names files list all 20 and 100."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    for name, count in (("train.bin", train), ("test.bin", test)):
        out = bytearray()
        for r in range(count):
            coarse = r % 4
            planes = rng.integers(0, 80, size=(3, 32, 32)).astype(np.uint8)
            planes[coarse % 3, (coarse // 3) * 16 : (coarse // 3) * 16 + 8, :] = 250
            out += bytes([coarse, coarse * 5 + r % 5])
            out += planes.tobytes()
        assert len(out) == count * 3074
        (folder / name).write_bytes(bytes(out))
    (folder / "coarse_label_names.txt").write_text("\n".join(COARSE_NAMES) + "\n")
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)) + "\n")
    return root


# ---- what a finished sweep must show ----


def onnx_input_dims(model: Path) -> list[int | str]:
    (graph_input,) = onnx.load(str(model), load_external_data=False).graph.input
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in graph_input.type.tensor_type.shape.dim]


def check_finished_sweep(run_dir: Path, uri: str | None, *, kind: str, shape: list[int], classes: list[str],
                         n_items: int) -> dict:
    """The sweep's records agree with each other and with the data; returns data.json."""
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "COMPLETE").all(), trials[["number", "status", "error"]]

    data = json.loads((run_dir / "data.json").read_text())
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert data["kind"] == kind
    assert isinstance(data["fingerprint"], str) and len(data["fingerprint"]) == 16
    assert cfg.dataset.fingerprint == data["fingerprint"]
    assert data["classes"] == classes and data["input_shape"] == shape
    assert sum(data["splits"].values()) == n_items and min(data["splits"].values()) > 0
    norm = data["normalization"]
    assert len(norm["mean"]) == len(norm["std"]) == shape[0] and all(s > 0 for s in norm["std"])

    if uri is not None:
        (parent,), children = mlflow_runs(uri, "hwnas-smoke")
        assert len(children) == 2
        params = parent.data.params
        assert params["data.fingerprint"] == data["fingerprint"] == parent.data.tags["data_fingerprint"]
        assert params["data.kind"] == kind
        assert params["data.input_shape"] == "x".join(map(str, shape))
        assert params["data.norm_mean"] == ",".join(f"{v:.6g}" for v in norm["mean"])
        assert params["data.norm_std"] == ",".join(f"{v:.6g}" for v in norm["std"])

    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["labels"] == classes and card["dataset"]["fingerprint"] == data["fingerprint"]
    assert card["input"]["shape"][1:] == shape
    assert {k: card["preprocessing"][k] for k in ("scale", "mean", "std")} == {k: norm[k] for k in ("scale", "mean", "std")}
    dims = onnx_input_dims(run_dir / "export" / "model.onnx")
    assert dims[1:] == shape, dims  # N×C×R×R: the batch dimension may be symbolic
    assert dims[0] == 1 or isinstance(dims[0], str), dims
    return data


def one_error_line(proc, prog: str = "hwnas") -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---- (a) an image folder, with Ray and MLflow in full, then hwnas-export ----


def test_image_folder_sweep_with_ray_and_mlflow(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_image_folder(folder)
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    proc = hwnas(*TINY, "dataset=image_folder", f"dataset.path={folder}", "dataset.resolution=24",
                 "runner=ray", "runner.max_concurrent=2", f"run_dir={run_dir}", f"tracking.uri={uri}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    assert "2/2 done" in proc.stdout
    data = check_finished_sweep(run_dir, uri, kind="image_folder", shape=[3, 24, 24], classes=IMAGE_CLASSES,
                                n_items=80)
    assert data["path"] == str(folder.resolve())
    assert not data["cache"]["reused"]  # this sweep decoded it, into the run folder
    assert Path(data["cache"]["path"]).is_relative_to(run_dir.resolve())

    # hwnas-export reads the images again (its own cache), finds the same data, and re-exports.
    before = json.loads((run_dir / "export" / "model_card.json").read_text())
    proc = hwnas_export(f"run_dir={run_dir}", f"tracking.uri={uri}")
    assert proc.returncode == 0, output_of(proc)
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["candidate"]["trial"] == before["candidate"]["trial"]
    assert card["metrics"]["val_accuracy"] == before["metrics"]["val_accuracy"]
    assert card["dataset"]["fingerprint"] == data["fingerprint"] and card["labels"] == IMAGE_CLASSES
    assert onnx_input_dims(run_dir / "export" / "model.onnx")[1:] == [3, 24, 24]


# ---- (b)-(d) an .npz, CIFAR-10 binaries, a LightningDataModule ----

SOURCES = {
    # name: (overrides after the data is written into tmp, kind, C×R×R, classes, items)
    "npz": (lambda d: ["dataset=npz", f"dataset.path={d / 'arrays.npz'}"], "npz", [3, 20, 20], NPZ_CLASSES, 150),
    "cifar10": (lambda d: ["dataset=cifar10", f"dataset.path={d / 'cifar'}"], "cifar10", [3, 32, 32],
                CIFAR10_NAMES, 240),
    "cifar100": (lambda d: ["dataset=cifar100", f"dataset.path={d / 'c100'}", "dataset.label=coarse"], "cifar100",
                 [3, 32, 32], COARSE_NAMES, 160),
    "lightning": (lambda d: ["dataset=lightning", "dataset.module._target_=own_datamodule.OwnDataModule",
                             "+dataset.module.seed=3", "plugins=[own_datamodule]"],
                  "lightning", [3, 16, 16], MODULE_CLASSES, 210),
}


@pytest.mark.parametrize("source", [
    pytest.param("npz", marks=pytest.mark.slow),  # ~25 s each with Ray: the array sources run with the slow tests
    pytest.param("cifar10", marks=pytest.mark.slow),
    pytest.param("cifar100", marks=pytest.mark.slow),
    "lightning",
])
def test_other_sources_sweep_and_export(tmp_path: Path, source: str) -> None:
    overrides, kind, shape, classes, n_items = SOURCES[source]
    if source == "npz":
        write_npz(tmp_path / "arrays.npz")
    elif source == "cifar10":
        write_cifar10(tmp_path / "cifar")
    elif source == "cifar100":
        write_cifar100(tmp_path / "c100")
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    # Ray, like the image folder: the decoded cache must reach Tune's worker processes for every source.
    proc = hwnas(*TINY, *overrides(tmp_path), "runner=ray", f"run_dir={run_dir}", f"tracking.uri={uri}",
                 timeout=600, env=PLUGIN_ENV)
    assert proc.returncode == 0, output_of(proc)
    data = check_finished_sweep(run_dir, uri, kind=kind, shape=shape, classes=classes, n_items=n_items)
    if source == "npz":
        assert data["splits"]["test"] == 30  # the file's own test split is kept
    elif source in ("cifar10", "cifar100"):
        assert data["splits"]["test"] == 40  # the test file, whole
    else:
        assert data["module"] == "own_datamodule.OwnDataModule"
        assert data["splits"] == {"train": 150, "val": 30, "test": 30}  # the module's own loaders


def test_own_datamodule_shuffles_yet_reads_as_one_fingerprint(tmp_path: Path) -> None:
    """The plug-in's train loader really comes in another order each read; hwnas sorts what it reads,
    so two reads are one fingerprint and one cache content. A module with only a train loader (the
    other hooks Lightning's own, which raise) gets val and test cut from it."""
    from own_datamodule import OwnDataModule

    from hwnas.evaluators.data import LightningData

    module = OwnDataModule(seed=3)
    module.setup("fit")
    first, second = (np.concatenate([y.numpy() for _, y in module.train_dataloader()]) for _ in range(2))
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)

    common = {"val_fraction": 0.2, "test_fraction": 0.2, "batch_size": 32, "seed": 0}
    reads = []
    for n in range(2):
        data = LightningData(module={"_target_": "own_datamodule.OwnDataModule", "seed": 3}, **common)
        summary = data.prepare(tmp_path / f"cache{n}")
        reads.append((summary["fingerprint"], data.arrays("train"), data.arrays("val")))
    assert reads[0][0] == reads[1][0]
    for a, b in zip(reads[0][1:], reads[1][1:], strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert summary["splits"] == {"train": 150, "val": 30, "test": 30} and summary["classes"] == MODULE_CLASSES

    data = LightningData(module={"_target_": "own_datamodule.TrainOnlyDataModule", "seed": 3}, **common)
    summary = data.prepare(tmp_path / "cache-train-only")
    assert summary["splits"] == {"train": 90, "val": 30, "test": 30}  # 20 % + 20 % of 150, per class


# ---- resume and hwnas-export refuse changed data ----


def test_resume_and_export_refuse_changed_images(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    files = write_image_folder(folder, per_class=20)
    run_dir = tmp_path / "run"
    args = [*TINY, "dataset=image_folder", f"dataset.path={folder}", "dataset.resolution=16", "runner=local",
            "tracking.enabled=false", f"run_dir={run_dir}"]
    proc = hwnas(*args)
    assert proc.returncode == 0, output_of(proc)
    pinned = OmegaConf.load(run_dir / "config.yaml").dataset.fingerprint
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 2

    # One pixel of one image changes: the file's bytes differ, its name, size and class do not.
    from PIL import Image

    image = files["squares"][4]
    original = image.read_bytes()
    with Image.open(image) as img:
        changed = img.copy()
    changed.putpixel((0, 0), (255, 255, 255) if changed.mode == "RGB" else 255)
    changed.save(image)
    assert image.read_bytes() != original

    resumed = hwnas(*args, "resume=true")
    assert resumed.returncode == 2, output_of(resumed)
    line = one_error_line(resumed)
    assert "image_folder" in line and "not the data this run was made with" in line, line
    assert pinned in line and str(folder.resolve()) in line
    assert read_jsonl(run_dir / "trials.jsonl") == records  # the run folder is untouched
    assert OmegaConf.load(run_dir / "config.yaml").dataset.fingerprint == pinned

    card = (run_dir / "export" / "model_card.json").read_bytes()
    exported = hwnas_export(f"run_dir={run_dir}", "tracking.enabled=false")
    assert exported.returncode == 2, output_of(exported)
    line = one_error_line(exported, "hwnas-export")
    assert "image_folder" in line and "not the data this run was made with" in line, line
    assert (run_dir / "export" / "model_card.json").read_bytes() == card  # the export the run made stays

    image.write_bytes(original)  # the data the run was made with again: resume goes on
    resumed = hwnas(*args, "resume=true")
    assert resumed.returncode == 0, output_of(resumed)
    assert len(read_jsonl(run_dir / "trials.jsonl")) == 2
    assert json.loads((run_dir / "data.json").read_text())["fingerprint"] == pinned


# ---- bad data: refused before anything is written ----


def _truncated_png(tmp: Path) -> tuple[list[str], str]:
    folder = tmp / "images"
    files = write_image_folder(folder, per_class=6)
    png = files["discs"][2]
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    return ["dataset=image_folder", f"dataset.path={folder}", "dataset.resolution=16"], "discs/002.png"


def _object_npz(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "pickled.npz"
    x = np.empty(20, dtype=object)
    x[:] = [np.zeros((8, 8)) for _ in range(20)]
    np.savez(path, x=x, y=np.arange(20) % 2)
    return ["dataset=npz", f"dataset.path={path}"], "pickled.npz"


def _short_cifar(tmp: Path) -> tuple[list[str], str]:
    root = write_cifar10(tmp / "cifar", records=4)
    batch = root / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    return ["dataset=cifar10", f"dataset.path={root}"], "data_batch_3.bin"


def _broken_module(tmp: Path) -> tuple[list[str], str]:
    return ["dataset=lightning", "dataset.module._target_=own_datamodule.OwnDataModule",
            "+dataset.module.broken=float_y", "plugins=[own_datamodule]"], "train_dataloader() yields y of torch.float32"


def _no_path(tmp: Path) -> tuple[list[str], str]:
    return ["dataset=image_folder"], "dataset.path: required"


def _space_too_deep(tmp: Path) -> tuple[list[str], str]:
    folder = tmp / "images"
    write_image_folder(folder, per_class=6)
    return ["dataset=image_folder", f"dataset.path={folder}", "dataset.resolution=8", "space.n_stages=[4]"], "space.n_stages"


def _cache_dir_under_a_file(tmp: Path) -> tuple[list[str], str]:
    overrides, _ = _space_too_deep(tmp)
    (tmp / "a_file").write_text("not a folder")
    return [*overrides[:3], f"dataset.cache_dir={tmp / 'a_file' / 'cache'}"], "dataset.cache_dir: NotADirectoryError"


BAD = {
    "truncated_png": _truncated_png,
    "object_npz": _object_npz,
    "short_cifar": _short_cifar,
    "broken_module": _broken_module,
    "no_path": _no_path,
    "space_too_deep": _space_too_deep,
    "cache_dir_under_a_file": _cache_dir_under_a_file,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_refused_before_anything(tmp_path: Path, case: str) -> None:
    overrides, named = BAD[case](tmp_path)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    proc = hwnas(*TINY, *overrides, "runner=ray", f"run_dir={run_dir}", f"tracking.uri=sqlite:///{db}",
                 timeout=300, env=PLUGIN_ENV)
    assert proc.returncode == 2, output_of(proc)
    line = one_error_line(proc)
    assert named in line, line
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
    assert not db.exists()
