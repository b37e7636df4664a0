"""What does reading an image folder cost: the one-off decode per sweep, and the data share of a trial?

    .venv/bin/python -m hwnas.scripts.bench_data [--n 50000] [--trials 3] [--epochs 1] \
        [--finetune-epochs 1] [--work DIR] [--keep] [--out results/bench/data_decode.json]

1. Generates `--n` 32x32 RGB PNGs in 10 class folders (WORK/images/class_<k>/<i>.png) with Pillow,
   in worker processes (one per core), then syncs them to disk. Each class is a colour and a stripe
   pattern of its own (orientation and frequency), shifted by up to 3 px, brightness-jittered and with
   Gaussian noise: learnable (easily: one epoch reaches ~100% val accuracy; only the times matter here),
   ~3 KB a file, about what CIFAR-10 images take as PNG. Generation time is reported; it is not part
   of the measurement.
2. The one-off decode: `ImageFolderData(path=WORK/images, resolution=32, channels=None,
   val_fraction=0.1, test_fraction=0.1, batch_size=64, seed=0).prepare(WORK/cache)`, its wall time
   split into scan (read + hash every file, read its header) and decode (pixels into the memmap
   cache, in `decode_workers` processes); then a fresh recipe prepares on the same cache root
   (reuse: the scan only). The files were just written, so both read them from the page cache.
3. The data share of a trial: a `PipelineEvaluator` built from the shipped config (conf/evaluator/
   pipeline.yaml, conf/space/macro_cnn.yaml, conf/hardware/cpu.yaml; `evaluator.epochs` and
   `evaluator.finetune_epochs` from the command line) on the prepared data evaluates `--trials`
   candidates: a plain-conv net, a dwsep net (pruned, int8) and an inverted-residual net (pruned,
   fp16), then ones drawn by a seeded Optuna RandomSampler. Each trial gets its own unpickled copy
   of the evaluator, as a Ray worker does, so it opens the cache and makes the val arrays itself.
   share = (data_s + data_load_s) / total_s; the target is a median share <= 5%.

Writes `--out` (JSON): the figures, the CPU (model, avx2, avx512_vnni), the load average before,
between the phases and after (other work shares this machine: `machine.busy` says when it did), the
library versions and the command line. WORK is a fresh temporary folder unless `--work` names one
(it must be empty or absent); what the script wrote there is removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path.cwd()  # results/ of the folder it runs in (the repository root, run as python -m hwnas.scripts.NAME)
TARGET_SHARE = 0.05
CLASSES = 10
SIZE = 32
GEN_PARALLEL_FROM = 2000  # below this many images one process writes them faster than starting workers
NOISE_SIGMA = 40.0
MAX_SHIFT = 3
BUSY_LOAD_PER_CORE = 0.5  # a 1-min load average above half the cores before the run: other work was running
# Representative macro-space candidates (conf/space/macro_cnn.yaml choices): the first --trials of these,
# then sampled ones.
FIXED_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"n_stages": 3, **{f"stage{i}.{k}": v for i, w in enumerate((16, 32, 64), 1)
                       for k, v in (("depth", 1), ("width", w), ("kernel", 3), ("block", "conv"))},
     "prune_ratio": 0.0, "quant": "fp32"},
    {"n_stages": 3, **{f"stage{i}.{k}": v for i, w in enumerate((24, 48, 96), 1)
                       for k, v in (("depth", 2), ("width", w), ("kernel", 3), ("block", "dwsep"))},
     "prune_ratio": 0.25, "quant": "int8"},
    {"n_stages": 4, **{f"stage{i}.{k}": v for i, w in enumerate((16, 24, 32, 48), 1)
                       for k, v in (("depth", 1), ("width", w), ("kernel", 3), ("block", "ir3"))},
     "prune_ratio": 0.5, "quant": "fp16"},
)


# ---- synthetic image folder ----


def class_templates(seed: int = 0) -> np.ndarray:
    """(CLASSES, SIZE, SIZE, 3) float32 in 0..255: a colour per class times a stripe pattern whose
    orientation and frequency are the class's own."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.empty((CLASSES, SIZE, SIZE, 3), dtype=np.float32)
    for k in range(CLASSES):
        angle = np.pi * k / CLASSES
        freq = 2 * np.pi * (2 + k % 3) / SIZE
        stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        colour = rng.uniform(60, 255, size=3).astype(np.float32)
        out[k] = 40 + stripes[:, :, None] * colour[None, None, :] * 0.8
    return out


def write_chunk(root: str, items: list[tuple[int, int]], seed: int) -> int:
    """Write the PNGs `items` ((index, label) pairs) under root/class_<label>/; returns bytes written."""
    from PIL import Image

    templates = class_templates()
    rng = np.random.default_rng(seed)
    written = 0
    for index, label in items:
        dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
        img = np.roll(templates[label], (int(dy), int(dx)), axis=(0, 1)) * rng.uniform(0.7, 1.2)
        img = img + rng.normal(0.0, NOISE_SIGMA, size=img.shape)
        path = Path(root) / f"class_{label}" / f"{index:06d}.png"
        Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), mode="RGB").save(path, format="PNG")
        written += path.stat().st_size
    return written


def generate_folder(root: Path, n: int, workers: int) -> dict[str, Any]:
    """n images, labels round-robin (n // 10 per class, give or take one), in `workers` processes."""
    for k in range(CLASSES):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    items = [(i, i % CLASSES) for i in range(n)]
    workers = 1 if n < GEN_PARALLEL_FROM else max(1, workers)
    started = time.perf_counter()
    if workers == 1:
        total_bytes = write_chunk(str(root), items, seed=0)
    else:
        step = max(500, n // (workers * 8))
        chunks = [items[s : s + step] for s in range(0, n, step)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            total_bytes = sum(pool.map(write_chunk, [str(root)] * len(chunks), chunks, range(len(chunks))))
    # Flush the new files to disk now, so that their writeback does not compete with the measured scan.
    os.sync()
    return {"generation_s": time.perf_counter() - started, "workers": workers, "bytes": total_bytes}


# ---- decode and reuse ----


def make_recipe(images: Path) -> Any:
    from hwnas.evaluators.data import ImageFolderData

    return ImageFolderData(path=str(images), resolution=SIZE, channels=None, val_fraction=0.1, test_fraction=0.1,
                           batch_size=64, seed=0)


def timed_prepare(images: Path, cache_root: Path) -> tuple[Any, dict[str, Any], float]:
    """(the prepared recipe, its summary, wall seconds of prepare)."""
    recipe = make_recipe(images)
    started = time.perf_counter()
    summary = recipe.prepare(cache_root)
    return recipe, summary, time.perf_counter() - started


def decode_figures(summary: Mapping[str, Any], wall_s: float, n: int, recipe: Any) -> dict[str, Any]:
    cache = summary["cache"]
    if cache["reused"]:
        raise RuntimeError(f"the first prepare reused a cache at {cache['path']}; the work folder was not fresh")
    return {
        "scan_s": cache["scan_s"],
        "decode_s": cache["decode_s"],
        "total_s": wall_s,
        "images_per_s": n / cache["decode_s"],
        "images_per_s_incl_scan": n / wall_s,
        "workers": recipe.decode_workers or os.cpu_count(),
        "cache_bytes": sum(f.stat().st_size for f in Path(cache["path"]).iterdir()),
        "splits": summary["splits"],
    }


def reuse_figures(summary: Mapping[str, Any], wall_s: float) -> dict[str, Any]:
    cache = summary["cache"]
    if not cache["reused"]:
        raise RuntimeError("the second prepare decoded again; it should have reused the cache")
    return {"scan_s": cache["scan_s"], "total_s": wall_s, "reused": True}


# ---- trials ----


def build_evaluator(data: Any, epochs: int, finetune_epochs: int) -> Any:
    """PipelineEvaluator as `hwnas dataset=image_folder` builds it (the shipped config's values),
    on the already prepared `data`; the space fitted to the data's input shape as the driver does."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hwnas.evaluators.measure.base import target_config
    from hwnas.search.config import compose_config
    from hwnas.spaces.base import fit_input

    cfg = compose_config([f"evaluator.epochs={epochs}", f"evaluator.finetune_epochs={finetune_epochs}"])
    space = instantiate(cfg.space)
    fit_input(space, data.input_shape)
    latency = instantiate(OmegaConf.create(target_config(cfg.hardware)))
    return instantiate(cfg.evaluator)(space=space, data=data, latency=latency, seed=int(cfg.seed))


def pick_candidates(space: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The fixed candidates first, then ones sampled by a seeded Optuna RandomSampler."""
    import optuna

    out = [space.candidate_from_params(c) for c in FIXED_CANDIDATES[:n]]
    if len(out) < n:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        while len(out) < n:
            trial = study.ask()
            out.append(space.candidate_from_params(space.suggest(trial)))
            study.tell(trial, 0.0)
    return out


def blocks_of(candidate: Mapping[str, Any]) -> list[str]:
    return [str(candidate[f"stage{i}.block"]) for i in range(1, int(candidate["n_stages"]) + 1)]


def data_share(metrics: Mapping[str, float]) -> float:
    total = float(metrics["total_s"])
    if total <= 0:
        raise ValueError(f"total_s: {total!r} is not allowed; allowed: a time > 0")
    return (float(metrics["data_s"]) + float(metrics["data_load_s"])) / total


def train_batches(evaluator: Any, candidate: Mapping[str, Any]) -> int:
    """Training batches a trial reads: epochs (plus fine-tune epochs when pruned) x batches per epoch."""
    per_epoch = math.ceil(len(evaluator.data._indices("train")) / evaluator.data.batch_size)
    finetune = evaluator.finetune_epochs if float(candidate["prune_ratio"]) > 0 else 0
    return (evaluator.epochs + finetune) * per_epoch


def run_trial(evaluator: Any, candidate: dict[str, Any], trial_dir: Path) -> dict[str, Any]:
    """One evaluation on a fresh copy of the evaluator (what a Ray worker unpickles)."""
    fresh = copy.deepcopy(evaluator)  # through __getstate__, as pickling to a worker: no cache, no arrays
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    ev = fresh.evaluate(candidate, trial_dir)
    wall = time.perf_counter() - wall_before
    m = ev.metrics
    steps = {k: m[k] for k in ("data_s", "data_load_s", "build_s", "train_s", "prune_s", "finetune_s", "profile_s",
                               "export_s", "compress_s", "accuracy_s", "latency_s")}
    return {
        "blocks": blocks_of(candidate),
        "prune_ratio": candidate["prune_ratio"],
        "quant": candidate["quant"],
        "candidate": candidate,
        "total_s": m["total_s"],
        "data_s": m["data_s"],
        "data_load_s": m["data_load_s"],
        "share": data_share(m),
        "train_batches": train_batches(evaluator, candidate),
        "data_load_ms_per_batch": 1000 * m["data_load_s"] / train_batches(evaluator, candidate),
        "train_ms_per_batch": 1000 * (m["train_s"] + m["finetune_s"]) / train_batches(evaluator, candidate),
        "steps_s": steps,
        "val_accuracy": m["val_accuracy"],
        # CPU seconds of this process over the trial's wall time: ~1 with torch_threads=1 when no other
        # work took the core; well below 1 means the trial waited for a core.
        "cpu_per_wall": (time.process_time() - cpu_before) / wall,
        "loadavg_after": loadavg(),
    }


def run_trials(data: Any, n: int, epochs: int, finetune_epochs: int, work: Path) -> dict[str, Any]:
    evaluator = build_evaluator(data, epochs, finetune_epochs)
    rows = []
    for i, candidate in enumerate(pick_candidates(evaluator.space, n)):
        row = run_trial(evaluator, candidate, work / "trials" / str(i))
        rows.append(row)
        print(f"[bench] trial {i} {'/'.join(row['blocks'])} p={row['prune_ratio']:g} {row['quant']}: total {row['total_s']:.1f} s, "
              f"data {row['data_s']:.2f} s + load {row['data_load_s']:.2f} s -> share {row['share']:.2%}, "
              f"val acc {row['val_accuracy']:.3f}", flush=True)
    settings = {k: getattr(evaluator, k) for k in ("epochs", "finetune_epochs", "torch_threads", "optimizer", "lr")}
    settings["batch_size"] = data.batch_size
    settings["latency_repeats"] = evaluator.latency.target.repeats
    return {"trials": rows, "settings": settings}


# ---- machine and report ----


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_info() -> dict[str, Any]:
    """The first CPU's model name and instruction-set flags, from /proc/cpuinfo (Linux)."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": model, "avx2": "avx2" in flags, "avx512_vnni": "avx512_vnni" in flags}


def machine(loads: Mapping[str, list[float]]) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    before = loads["before"][0]
    busy = before > BUSY_LOAD_PER_CORE * cores
    return {
        **cpu_info(),
        "cores": cores,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores,
        "loadavg": dict(loads),
        "busy": busy,
        "busy_note": (f"1-min load average {before} on {cores} cores before the run "
                      f"({'above' if busy else 'at or below'} the busy mark of {BUSY_LOAD_PER_CORE * cores:g}): "
                      + ("other work was running, so the times are slower than on an idle machine" if busy else
                         "little other work at the start")
                      + "; the later load averages include this benchmark's own processes"),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "pillow", "numpy", "onnxruntime", "pytorch-lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    d, r, m = report["decode"], report["reuse"], report["machine"]
    lines = [
        f"[bench] {report['n_images']} images generated in {report['generation_s']:.1f} s (not measured)",
        f"[bench] decode: scan {d['scan_s']:.1f} s + decode {d['decode_s']:.1f} s = {d['total_s']:.1f} s wall, "
        f"{d['images_per_s']:.0f} images/s decoding ({d['images_per_s_incl_scan']:.0f}/s with the scan)",
        f"[bench] reuse: scan {r['scan_s']:.1f} s, prepare {r['total_s']:.1f} s wall",
        f"[bench] shares {[round(t['share'], 4) for t in report['trials']]}, median {report['median_share']:.2%} "
        f"-> {'met' if report['met'] else 'MISSED'} (target <= {report['target']:.0%})",
        f"[bench] {m['cpu_model']}, avx2={m['avx2']}, avx512_vnni={m['avx512_vnni']}, {m['cores']} cores; {m['busy_note']}",
        f"[bench] load averages {m['loadavg']}",
    ]
    return lines


def remove_ours(work: Path, created: bool) -> None:
    for name in ("images", "cache", "trials"):
        shutil.rmtree(work / name, ignore_errors=True)
    if created:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="images to generate (10 classes)")
    parser.add_argument("--trials", type=int, default=3, help="pipeline evaluations for the data share")
    parser.add_argument("--epochs", type=int, default=1, help="evaluator.epochs of each trial")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="evaluator.finetune_epochs (pruned candidates)")
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="processes writing the PNGs")
    parser.add_argument("--work", type=Path, default=None, help="empty or absent folder for images, cache and trials")
    parser.add_argument("--keep", action="store_true", help="leave the images, cache and trials in the work folder")
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/data_decode.json")
    args = parser.parse_args(argv)
    if args.n < 10 * CLASSES:
        parser.error(f"--n: {args.n} is too few; allowed: an integer >= {10 * CLASSES}")
    for key in ("trials", "epochs", "gen_workers"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}: {getattr(args, key)} is not allowed; allowed: an integer >= 1")
    if args.finetune_epochs < 0:
        parser.error(f"--finetune-epochs: {args.finetune_epochs} is negative; allowed: an integer >= 0")
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        parser.error(f"--work: {str(args.work)!r} is not an empty folder; allowed: an empty or absent folder")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loads = {"before": loadavg()}
    created = args.work is None or not args.work.exists()
    work = Path(tempfile.mkdtemp(prefix="hwnas-bench-data-", dir="/tmp")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    images, cache_root = work / "images", work / "cache"
    try:
        print(f"[bench] generating {args.n} PNGs in {images}", flush=True)
        gen = generate_folder(images, args.n, args.gen_workers)
        loads["before_decode"] = loadavg()
        recipe, summary, wall = timed_prepare(images, cache_root)
        decode = decode_figures(summary, wall, args.n, recipe)
        print(f"[bench] decode {decode['total_s']:.1f} s (scan {decode['scan_s']:.1f} s)", flush=True)
        loads["before_reuse"] = loadavg()
        data, summary, wall = timed_prepare(images, cache_root)
        reuse = reuse_figures(summary, wall)
        loads["before_trials"] = loadavg()
        trials = run_trials(data, args.trials, args.epochs, args.finetune_epochs, work)
        loads["after"] = loadavg()
    finally:
        if not args.keep:
            remove_ours(work, created)
    shares = [t["share"] for t in trials["trials"]]
    report: dict[str, Any] = {
        "what": "one-off decode of an image folder, reuse of its cache, and the data share of pipeline trials",
        "command": [sys.executable, "-m", "hwnas.scripts.bench_data", *(sys.argv[1:] if argv is None else argv)],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_images": args.n,
        "classes": CLASSES,
        "resolution": SIZE,
        "png_bytes": gen["bytes"],
        "generation_s": gen["generation_s"],
        "generation_workers": gen["workers"],
        "page_cache": "hot: the PNGs were written just before the scan, so neither prepare read the disk",
        "decode": decode,
        "reuse": reuse,
        "trial_settings": trials["settings"],
        "trials": trials["trials"],
        "median_share": median(shares),
        "share_formula": "(data_s + data_load_s) / total_s",
        "target": TARGET_SHARE,
        "met": median(shares) <= TARGET_SHARE,
        "machine": machine(loads),
        "versions": versions(),
        "work": str(work) if args.keep else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(summary_lines(report)))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
