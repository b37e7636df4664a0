"""LatencyCache: round trip, several processes writing one file, refusal of files that are not a cache,
corrupt rows skipped; ONNX features of tiny real networks (MACs counted by hand)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from hwnas.evaluators.measure.cache import LatencyCache, file_sha256
from hwnas.evaluators.measure.features import FEATURE_NAMES, onnx_features


def measurement(ms: float) -> dict:
    """A Measurement as protocol.Measurement.to_dict() writes it."""
    from hwnas.evaluators.measure.protocol import Measurement

    return Measurement(
        median_ms=ms, p90_ms=ms * 1.1, p99_ms=ms * 1.2, mean_ms=ms, std_ms=0.01, cv=0.01, resolution_pct=0.5,
        n_runs=30, n_blocks=30, runs_per_block=1, rounds=1, provider="CPUExecutionProvider", intra_op_threads=1,
        input_shape=(1, 3, 8, 8), output_shape=(1, 10), protocol={}, fingerprint={"cpu_model": "Test CPU"},
        device_id="dev1",
    ).to_dict()


SHA = "ab" * 32


def test_round_trip_and_table(tmp_path: Path) -> None:
    cache = LatencyCache(tmp_path / "c.sqlite")
    assert cache.get(SHA, "dev1", "p1") is None
    cache.put(SHA, "dev1", "p1", measurement(1.5), arch="a1", candidate={"x": 1}, space="nb201")
    cache.put("cd" * 32, "dev2", "p1", measurement(2.5), arch="a2", candidate={"x": 2}, space="nb201")
    got = cache.get(SHA, "dev1", "p1")
    assert got.median_ms == 1.5 and got.source == "cache"
    assert cache.get(SHA, "dev1", "other-protocol") is None
    assert cache.devices() == ["dev1", "dev2"]
    table = LatencyCache(tmp_path / "c.sqlite").table("dev1")  # reopened: persisted
    assert list(table["arch"]) == ["a1"] and table["latency_ms"][0] == 1.5
    assert table["cpu_model"][0] == "Test CPU" and json.loads(table["candidate"][0]) == {"x": 1}
    assert len(cache.table()) == 2
    with pytest.raises(ValueError, match="median_ms"):
        cache.put(SHA, "dev1", "p1", {"median_ms": -1}, arch="a", candidate={}, space="s")


def test_file_sha256(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 3_000_000)
    assert file_sha256(p) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


WRITER = """
import sys
from hwnas.evaluators.measure.cache import LatencyCache
from test_latency_cache import measurement
cache = LatencyCache(sys.argv[1])
w = int(sys.argv[2])
for i in range(40):
    cache.put(f"{w:02x}{i:02x}".ljust(64, "0"), "dev", "p", measurement(1 + i), arch=f"w{w}-{i}", candidate={"i": i}, space="s")
"""


def test_several_processes_write_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    LatencyCache(path)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)], cwd=Path(__file__).parent)
        for w in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    cache = LatencyCache(path)
    assert len(cache) == 160 and len(cache.table("dev")) == 160


CREATOR = """
import sys, time
from hwnas.evaluators.measure.cache import LatencyCache
from test_latency_cache import measurement
start = float(sys.argv[3])
while time.time() < start:  # every process opens the new file at the same moment
    pass
w = int(sys.argv[2])
cache = LatencyCache(sys.argv[1])
cache.put(f"{w:02x}".ljust(64, "0"), "dev", "p", measurement(1 + w), arch=f"w{w}", candidate={"w": w}, space="s")
"""


@pytest.mark.parametrize("round_", range(3))
def test_processes_that_create_the_file_together_all_succeed(tmp_path: Path, round_: int) -> None:
    # Two Ray trials of a new experiment folder open its cache at once: found by a CI sweep where one
    # trial failed with "database is locked" while the file was being created.
    path = tmp_path / f"new{round_}.sqlite"
    start = str(time.time() + 1.5)
    procs = [
        subprocess.Popen([sys.executable, "-c", CREATOR, str(path), str(w), start], cwd=Path(__file__).parent,
                         stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert len(LatencyCache(path)) == 4


def test_not_a_cache_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, not a database\n")
    with pytest.raises(ValueError, match="not an SQLite file") as e:
        LatencyCache(text)
    assert "\n" not in str(e.value)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(ValueError, match="something else"):
        LatencyCache(other)
    with pytest.raises(ValueError, match="folder"):
        LatencyCache(tmp_path)


def test_corrupt_row_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    cache = LatencyCache(path)
    cache.put(SHA, "dev", "p", measurement(1.0), arch="good", candidate={}, space="s")
    cache.put("cd" * 32, "dev", "p", measurement(2.0), arch="bad", candidate={}, space="s")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hwnas_latency SET measurement='{not json' WHERE arch='bad'")
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.get("cd" * 32, "dev", "p") is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = cache.table()
    assert list(table["arch"]) == ["good"] and any("corrupt" in str(w.message) for w in caught)


# ---- features of tiny real networks ----


def export(model, shape: tuple[int, ...], path: Path) -> Path:
    import torch

    from hwnas.evaluators.onnx_export import export_onnx

    return export_onnx(model.eval(), torch.zeros(1, *shape), path, opset=17)


def test_features_count_macs_by_hand(tmp_path: Path) -> None:
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8x8x8 outputs x 3*3*3 = 13,824 MACs, 216 params
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 512 outputs x 9 = 4,608 MACs, 72 + 8 params
        nn.Conv2d(8, 16, 1),  # 1x1: 1,024 outputs x 8 = 8,192 MACs, 128 + 16 params
        nn.AdaptiveAvgPool2d(1),  # global pool over 16x8x8 = 1,024
        nn.Flatten(),
        nn.Linear(16, 10),  # 160 MACs, 170 params
    )
    f = onnx_features(export(model, (3, 8, 8), tmp_path / "m.onnx"))
    assert set(f) == set(FEATURE_NAMES)
    assert f["macs_conv_dense"] == 13_824 and f["params_conv_dense"] == 216
    assert f["macs_conv_dw"] == 4_608 and f["params_conv_dw"] == 80
    assert f["macs_conv_1x1"] == 8_192 and f["params_conv_1x1"] == 144
    assert f["macs_matmul"] == 160 and f["params_matmul"] == 170
    assert f["macs_pool"] == 1_024
    assert f["params"] == 216 + 80 + 144 + 170
    assert f["nodes_conv_dense"] == 1 and f["nodes_conv_dw"] == 1 and f["nodes_conv_1x1"] == 1
    assert f["nodes_quant"] == 0 and f["input_elems"] == 192
    assert f["activation_bytes"] >= 4 * (512 * 3 + 1024)  # conv, relu, dw outputs + the 1x1's output


def test_features_count_quantized_nodes(tmp_path: Path) -> None:
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from torch import nn

    path = export(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)), (3, 8, 8), tmp_path / "f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.data = iter([{"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}])

        def get_next(self):
            return next(self.data, None)

    q = tmp_path / "q.onnx"
    quantize_static(str(path), str(q), Reader(), weight_type=QuantType.QInt8)
    f = onnx_features(q)
    assert f["nodes_qdq"] > 0
    assert f["macs_conv_dense"] == 8 * 6 * 6 * 27  # still counted through the dequantized weight


def test_bad_files_are_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    for target in (bad, tmp_path / "missing.onnx", b""):
        with pytest.raises(ValueError) as e:
            onnx_features(target)
        assert "\n" not in str(e.value) and "onnx model" in str(e.value)


def test_a_cache_in_use_travels_to_another_process_by_pickle(tmp_path: Path) -> None:
    # The plan opens an existing cache in the driver, then Ray pickles it into every worker: the open
    # connection stays behind, the copy opens its own.
    import pickle

    cache = LatencyCache(tmp_path / "c.sqlite")
    cache.put(SHA, "dev", "p", measurement(1.0), arch="a", candidate={}, space="s")
    copy = pickle.loads(pickle.dumps(cache))
    copy.put("cd" * 32, "dev", "p", measurement(2.0), arch="b", candidate={}, space="s")
    assert len(copy) == 2 and len(cache) == 2 and copy.get(SHA, "dev", "p").median_ms == 1.0
