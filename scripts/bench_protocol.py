"""How repeatable the latency protocol is on this machine: results/bench/protocol.json.

~12 fp32 ONNX files of the default macro space (conf/space/macro_cnn.yaml; random candidates, fixed seed;
untrained weights: timing does not depend on weight values) at 1x8x8 (digits), 3x32x32 and 3x96x96, spanning
about 30 µs to 2 ms. Each file is measured `--repeats` times with the new protocol (a fresh session each
time, interleaved over files so that slow drifts of the machine spread over all of them) and with the
old one (10 warm-up runs, median of 50 single runs). Per file: the median latency, the CV of the
repeats' medians (target <= 2%), the protocol's own resolution_pct, rounds and seconds per measurement.
The smallest relative difference resolved between two measurements is 1.96 * sqrt(2) * CV.

    .venv/bin/python -m hwnas.scripts.bench_protocol [--repeats 10] [--out results/bench/protocol.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((1, 8, 8), (3, 32, 32), (3, 96, 96))


def sample_files(n_per_shape: int, seed: int, tmp: Path) -> list[dict[str, Any]]:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hwnas.evaluators.onnx_export import export_onnx

    out = []
    rng = random.Random(seed)
    for shape in SHAPES:
        space = instantiate(OmegaConf.load(ROOT / "conf" / "space" / "macro_cnn.yaml"))
        space.fit_input(shape)  # an 8x8 input holds at most 3 stages
        decisions = space.decisions()
        for i in range(n_per_shape):
            params: dict[str, Any] = {"n_stages": rng.choice(decisions["n_stages"])}
            for key in space.stage_keys(params["n_stages"]):
                params[key] = rng.choice(decisions[key])
            params.update(prune_ratio=0.0, quant="fp32")
            cand = space.candidate_from_params(params)
            torch.manual_seed(seed + i)
            model = space.build(cand, shape, 10).eval()
            path = export_onnx(model, torch.zeros(1, *shape), tmp / f"m{shape[-1]}_{i}.onnx", opset=17)
            out.append({"file": path, "name": space.name(cand), "input": list(shape)})
    return out


def old_protocol_ms(path: Path) -> float:
    """What evaluators/latency.py did before issue 11: 10 warm-up runs, median of 50 single runs."""
    from hwnas.evaluators.measure.protocol import MeasureProtocol, _input, make_session

    session = make_session(path, "cpu", MeasureProtocol())
    name, x = _input(session, 1)
    feed = {name: x}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(50):
        start = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - start)
    return float(np.median(times)) / 1e6


def cpu_info() -> dict[str, Any]:
    from hwnas.evaluators.measure.fingerprint import device_fingerprint, int8_has_vnni

    fp = device_fingerprint("cpu")
    return {
        "model_name": fp["cpu_model"], "logical_cores": fp["logical_cores"], "avx2": "avx2" in fp["flags"],
        "avx512_vnni": "avx512_vnni" in fp["flags"], "int8_has_vnni": int8_has_vnni(fp), "flags": fp["flags"],
        "onnxruntime": fp["onnxruntime"],
    }


def cv(values: list[float]) -> float:
    a = np.asarray(values)
    return float(a.std(ddof=1) / a.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--nets", type=int, default=4, help="files per input shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-ms", type=float, default=None)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--cv-threshold", type=float, default=None)
    parser.add_argument("--max-rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "protocol.json")
    args = parser.parse_args()

    from hwnas.evaluators.measure.fingerprint import device_fingerprint
    from hwnas.evaluators.measure.local import pinned
    from hwnas.evaluators.measure.protocol import MeasureProtocol, measure_file

    overrides = {k: v for k, v in (("block_s", None if args.block_ms is None else args.block_ms / 1000),
                                   ("blocks", args.blocks), ("cv_threshold", args.cv_threshold),
                                   ("max_rounds", args.max_rounds)) if v is not None}
    protocol = MeasureProtocol(**overrides)
    fp = device_fingerprint("cpu")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        files = sample_files(args.nets, args.seed, Path(tmp))
        rows: list[dict[str, Any]] = [{**f, "new": [], "old": [], "res": [], "rounds": [], "s": []} for f in files]
        for rep in range(args.repeats):
            for row in rows:
                # As LocalTarget(affinity=auto) does: the session is made and timed on one pinned core.
                with pinned(1):
                    start = time.perf_counter()
                    m = measure_file(row["file"], "cpu", protocol, fingerprint=fp)
                    row["s"].append(time.perf_counter() - start)
                    row["old"].append(old_protocol_ms(row["file"]))
                row["new"].append(m.median_ms)
                row["res"].append(m.resolution_pct)
                row["rounds"].append(m.rounds)
            print(f"[bench] repeat {rep + 1}/{args.repeats} load {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    per_file = []
    for row in rows:
        per_file.append({
            "name": row["name"], "input": row["input"],
            "median_ms": float(np.median(row["new"])),
            "cv_of_medians_pct": 100 * cv(row["new"]),
            "resolution_pct_mean": float(np.mean(row["res"])),
            "rounds_mean": float(np.mean(row["rounds"])),
            "seconds_per_measurement": float(np.mean(row["s"])),
            "old_median_ms": float(np.median(row["old"])),
            "old_cv_of_medians_pct": 100 * cv(row["old"]),
        })
    per_file.sort(key=lambda r: r["median_ms"])
    cvs = [r["cv_of_medians_pct"] for r in per_file]
    old_cvs = [r["old_cv_of_medians_pct"] for r in per_file]
    result = {
        "what": "repeatability of the latency protocol (evaluators/measure/protocol.py) on default macro-space files",
        "cpu": cpu_info(),
        "protocol": protocol.to_dict(),
        "repeats": args.repeats,
        "files": len(per_file),
        "load_average_1_5_15": {"before": list(load_before), "after": list(load_after)},
        "summary": {
            "cv_of_medians_pct": {"max": max(cvs), "median": float(np.median(cvs)), "mean": float(np.mean(cvs))},
            "files_with_cv_le_2pct": sum(c <= 2.0 for c in cvs),
            "old_protocol_cv_of_medians_pct": {"max": max(old_cvs), "median": float(np.median(old_cvs))},
            "resolution_pct_median": float(np.median([r["resolution_pct_mean"] for r in per_file])),
            # Two measurements of files differing by less than this are not told apart (95%, per file's CV).
            "smallest_resolved_difference_pct": {"median": 1.96 * 2**0.5 * float(np.median(cvs)),
                                                 "worst": 1.96 * 2**0.5 * max(cvs)},
            "seconds_per_measurement": {
                "median": float(np.median([r["seconds_per_measurement"] for r in per_file])),
                "max": max(r["seconds_per_measurement"] for r in per_file),
                "note": "includes the ONNX Runtime session creation and the warm-up; old protocol not included",
            },
            "latency_range_ms": [per_file[0]["median_ms"], per_file[-1]["median_ms"]],
        },
        "per_file": per_file,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
