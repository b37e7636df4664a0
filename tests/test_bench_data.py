"""scripts/bench_data.py end to end at a tiny size (a subprocess, as a user runs it), and its pure helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_module import load_script

bench = load_script("bench_data")


def test_data_share_is_data_time_over_trial_time() -> None:
    assert bench.data_share({"data_s": 1.0, "data_load_s": 3.0, "total_s": 40.0}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_s"):
        bench.data_share({"data_s": 0.0, "data_load_s": 0.0, "total_s": 0.0})


def test_class_templates_differ_between_classes() -> None:
    t = bench.class_templates()
    assert t.shape == (bench.CLASSES, bench.SIZE, bench.SIZE, 3)
    assert t.min() >= 0 and t.max() <= 255
    flat = t.reshape(len(t), -1)
    gaps = [abs(flat[i] - flat[j]).mean() for i in range(len(t)) for j in range(i + 1, len(t))]
    assert min(gaps) > 10  # no two classes look alike before the noise


def test_tiny_run_writes_sensible_figures(tmp_path: Path) -> None:
    out, work = tmp_path / "data_decode.json", tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "hwnas.scripts.bench_data", "--n", "200", "--trials", "1", "--epochs", "1",
               "--out", str(out), "--work", str(work)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["n_images"] == 200 and report["resolution"] == 32
    assert report["generation_s"] > 0
    decode = report["decode"]
    assert decode["decode_s"] > 0 and decode["scan_s"] > 0 and decode["total_s"] >= decode["decode_s"]
    assert decode["images_per_s"] == pytest.approx(200 / decode["decode_s"])
    assert sum(decode["splits"].values()) == 200
    assert report["reuse"]["scan_s"] > 0 and report["reuse"]["reused"] is True
    assert len(report["trials"]) == 1
    trial = report["trials"][0]
    assert 0 <= trial["share"] <= 1 and trial["total_s"] > 0 and trial["data_s"] >= 0 and trial["data_load_s"] > 0
    assert trial["train_batches"] == 3  # 160 training images, batches of 64, one epoch, not pruned
    assert report["median_share"] == pytest.approx(trial["share"])
    assert report["target"] == 0.05 and report["met"] == (report["median_share"] <= 0.05)
    machine = report["machine"]
    assert isinstance(machine["avx2"], bool) and isinstance(machine["avx512_vnni"], bool) and machine["cores"] >= 1
    assert {"before", "after"} <= set(machine["loadavg"])
    assert set(report["versions"]) >= {"torch", "pillow", "numpy"}
    assert report["command"][-4:] == ["--out", str(out), "--work", str(work)]
    assert not any(work.iterdir())  # images, cache and trials removed; the folder given is left


def test_work_folder_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "hwnas.scripts.bench_data", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--work" in proc.stderr
