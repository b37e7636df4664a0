"""What each numeric format really computes on this CPU, and what it costs: results/bench/formats.json.

For a few default-space macro CNNs (hwnas.spaces.macro_cnn, conf/space/macro_cnn.yaml) on sklearn
digits at 1x8x8 and 3x32x32, trained briefly with plain torch: per format, the ONNX Runtime latency
(hwnas.evaluators.measure.protocol, one thread, batch 1), the file's bytes, the op types of ORT's
optimized graph (the evidence of integer kernels, or of Casts around float32 ones) and the accuracy
change against fp32. int8 is written twice, with full 8-bit and with 7-bit (reduced range) weights.
fp16 is refused on this CPU (hwnas.evaluators.measure.formats); the file made for a CUDA target is
still run on the CPU EP to show what the CPU would do with it (Casts around float32 kernels).

    python -m hwnas.scripts.bench_formats [--nets 6] [--epochs 5] [--out results/bench/formats.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from torch import nn

from hwnas.evaluators.measure.fingerprint import device_fingerprint, int8_has_vnni
from hwnas.evaluators.measure.formats import format_support
from hwnas.evaluators.measure.protocol import MeasureProtocol, measure_file
from hwnas.evaluators.onnx_accuracy import onnx_accuracy
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.quantize import compress_onnx
from hwnas.spaces.macro_cnn import MacroCNNSpace

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 7  # interleaved latency rounds per net
# (name, compress_onnx format, keyword arguments)
VARIANTS = [
    ("fp32", "fp32", {}),
    ("int8_7bit", "int8", {"int8_full_range": False}),
    ("int8_8bit", "int8", {"int8_full_range": True}),
    ("int4", "int4", {}),
    # Made for a CUDA target (fp16 is refused for this CPU); run on the CPU EP as evidence only.
    (
        "fp16_on_cpu_ep",
        "fp16",
        {"provider": "cuda", "fingerprint": {"arch": "x86_64", "flags": [], "gpu": {}}},
    ),
]


def digits(size: int, channels: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """sklearn digits scaled to [0, 1], resized (bilinear) to size x size, channels repeated; 70/30 split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.from_numpy(raw.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1).numpy()
    x = (x - x.mean()) / x.std()
    y = raw.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.7 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    """A few epochs of Adam: enough for a net that answers, which is all a format comparison needs."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def sample_candidates(space: MacroCNNSpace, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cand: dict[str, Any] = {"n_stages": rng.choice(space.n_stages)}
        for i in range(1, cand["n_stages"] + 1):
            for field, choices in space.stage_choices().items():
                cand[f"stage{i}.{field}"] = rng.choice(choices)
        out.append(cand)
    return out


def optimized_ops(path: Path, tmp: Path) -> dict[str, int]:
    """Op types of the graph ORT's CPU EP runs (all optimizations, as the latency session has them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3  # the "hardware specific optimizations" warning on saving: expected
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))


def bench_net(space, cand, data, epochs, seed, protocol, fingerprint, tmp: Path) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = data
    shape = tuple(x_tr.shape[1:])
    torch.manual_seed(seed)
    model = train(space.build(cand, shape, 10), x_tr, y_tr, epochs, seed)
    fp32 = export_onnx(model, torch.from_numpy(x_tr[:1]), tmp / "fp32_src.onnx", opset=17)
    calibration = x_tr[:256]
    row: dict[str, Any] = {"name": space.name(cand), "input": list(shape), "candidate": cand, "formats": {}}
    paths = {
        name: compress_onnx(fp32, fmt, calibration, tmp / f"{name}.onnx", **kw) for name, fmt, kw in VARIANTS
    }
    # Interleaved rounds (every variant once a round) and the median over rounds: this 2-core machine is
    # shared, and load that drifts between one variant's measurement and the next would pass for a
    # format's speed. The spread of the round medians is kept beside each figure.
    medians: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, path in paths.items():
            medians[name].append(measure_file(path, "cpu", protocol, fingerprint=fingerprint).median_ms)
    base_acc = base_ms = None
    for name, path in paths.items():
        acc = float(onnx_accuracy(path, x_te, y_te))
        ms = float(np.median(medians[name]))
        if name == "fp32":
            base_acc, base_ms = acc, ms
        row["formats"][name] = {
            "bytes": path.stat().st_size,
            "latency_ms": round(ms, 5),
            "latency_round_spread_pct": round(100 * (max(medians[name]) - min(medians[name])) / ms, 1),
            "speed_vs_fp32": round(base_ms / ms, 3),
            "accuracy": round(acc, 4),
            "accuracy_delta": round(acc - base_acc, 4),
            "optimized_ops": optimized_ops(path, tmp),
        }
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, _, _ in VARIANTS:
        speed = [r["formats"][name]["speed_vs_fp32"] for r in rows]
        delta = [r["formats"][name]["accuracy_delta"] for r in rows]
        size = [r["formats"][name]["bytes"] / r["formats"]["fp32"]["bytes"] for r in rows]
        out[name] = {
            "median_speed_vs_fp32": round(float(np.median(speed)), 3),
            "min_speed_vs_fp32": round(float(np.min(speed)), 3),
            "max_speed_vs_fp32": round(float(np.max(speed)), 3),
            "mean_accuracy_delta": round(float(np.mean(delta)), 4),
            "worst_accuracy_delta": round(float(np.min(delta)), 4),
            "median_bytes_vs_fp32": round(float(np.median(size)), 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "formats.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    fingerprint = device_fingerprint("cpu")
    protocol = MeasureProtocol(batch_size=1, threads=1)
    cfg = yaml.safe_load((ROOT / "conf" / "space" / "macro_cnn.yaml").read_text())
    cfg.pop("_target_")
    start = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, Any] = {"inputs": {}}
    for label, (size, channels) in {"digits_1x8x8": (8, 1), "digits_3x32x32": (32, 3)}.items():
        space = MacroCNNSpace(**cfg)
        space.fit_input((channels, size, size))
        data = digits(size, channels, args.seed)
        rows = []
        for i, cand in enumerate(sample_candidates(space, args.nets, args.seed + size)):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(
                    bench_net(space, cand, data, args.epochs, args.seed + i, protocol, fingerprint, Path(tmp))
                )
            print(
                label,
                rows[-1]["name"],
                {k: v["speed_vs_fp32"] for k, v in rows[-1]["formats"].items()},
                flush=True,
            )
        results["inputs"][label] = {"summary": summary(rows), "nets": rows}
    report = {
        "what": "numeric formats on this CPU: ORT optimized-graph ops, latency, bytes, accuracy vs fp32 (sklearn digits)",
        "device": {
            "cpu_model": fingerprint.get("cpu_model"),
            "arch": fingerprint.get("arch"),
            "flags": fingerprint.get("flags"),
            "avx2": "avx2" in fingerprint.get("flags", []),
            "avx512_vnni": "avx512_vnni" in fingerprint.get("flags", []),
            "avx_vnni": "avx_vnni" in fingerprint.get("flags", []),
            "int8_has_vnni": int8_has_vnni(fingerprint),
            "onnxruntime": ort.__version__,
        },
        "formats_on_this_cpu": {
            fmt: (s.computes if s.ok else f"refused: {s.reason}")
            for fmt in ("fp32", "fp16", "int8", "int4")
            for s in [format_support(fmt, "cpu", fingerprint)]
        },
        "protocol": protocol.to_dict(),
        "training": {"epochs": args.epochs, "optimizer": "adam lr 3e-3", "split": "70/30 of sklearn digits"},
        "load_average_at_start": load_start,
        "seconds": None,
        **results,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v["summary"] for k, v in results["inputs"].items()}, indent=1))
    return report


if __name__ == "__main__":
    main()
