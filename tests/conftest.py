"""Helpers and fixtures shared by several test files: running the real commands in a subprocess,
reading a run's records, a tmp MLflow store, a tiny NAS-Bench-201 table, and what accelerator is here.

Test modules import the plain helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
Nothing here imports torch, so collecting the config-only test files stays cheap.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# ---- the real commands, each in its own interpreter ----

_ENTRY = {
    "hwnas": "import sys; from hwnas.search.cli import main; sys.exit(main())",
    "hwnas-export": "import sys; from hwnas.search.cli import export_main; sys.exit(export_main())",
    "hwnas-sync": "import sys; from hwnas.search.cli import sync_main; sys.exit(sync_main())",
    "hwnas-report": "import sys; from hwnas.search.report import main; sys.exit(main())",
}


def hwnas_command(*overrides: str, entry: str = "hwnas") -> list[str]:
    """argv of `hwnas` (or `hwnas-export`, `hwnas-sync`) run by this interpreter, for Popen."""
    return [sys.executable, "-c", _ENTRY[entry], *overrides]


def hwnas(*overrides: str, timeout: float = 300, entry: str = "hwnas", env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; stdout and stderr captured as text."""
    return subprocess.run(
        hwnas_command(*overrides, entry=entry), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def hwnas_export(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return hwnas(*args, timeout=timeout, entry="hwnas-export")


def kill_when(args: list[str], ready: Callable[[], Any], what: str, timeout: float = 300, poll: float = 0.05) -> None:
    """Start `hwnas *args` in a session of its own and SIGKILL the whole process group (driver, Ray, trials) as
    soon as `ready()` is true; fails if the sweep ends first or `what` does not happen within `timeout` s."""
    import signal
    import time

    proc = subprocess.Popen(hwnas_command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the sweep ended before {what}: " + proc.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
            time.sleep(poll)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_after_first_trial_then_resume(args: list[str], run_dir: Path, n: int) -> tuple[list[dict], list[dict]]:
    """Start `hwnas *args`, SIGKILL its whole process group once a trial is recorded, then resume it to the end.
    Returns (the records before the kill, all records after the resume); asserts the resume finished."""
    kill_when(args, lambda: len(read_jsonl(run_dir / "trials.jsonl")) >= 1, "trial recorded", timeout=240)
    before = read_jsonl(run_dir / "trials.jsonl")
    assert 1 <= len(before) < n
    done = hwnas(*args, "resume=true", timeout=300)
    assert done.returncode == 0, output_of(done)
    rows = read_jsonl(run_dir / "trials.jsonl")
    assert len(rows) == n and rows[: len(before)] == before
    return before, rows


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    """The tail of a finished command's output, for assertion messages."""
    return (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]


# ---- a run folder's records ----


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (trials.jsonl); [] while it does not exist yet. A torn last
    line (a writer killed mid-write) is not a record, as TrialLog reads it."""
    if not path.exists():
        return []
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise  # only the last line may be torn (a process killed mid-write)
    return rows


def mlflow_runs(uri: str, experiment: str) -> tuple[list, list]:
    """(parent runs, trial runs) of an MLflow experiment; the export's own run (a child too, tagged
    hwnas.role=export) is in neither list: `export_runs` finds it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {uri}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("hwnas.role") != "export"]


def assert_trial_runs_match(uri: str, experiment: str, rows: list[dict], params: Iterable[str] = (),
                            metrics: Iterable[str] = ()) -> None:
    """One ended MLflow child run per recorded trial, each holding its trial's candidate values (`params`) and
    metrics (`metrics`) as the trial record has them."""
    by_number = {r["number"]: r for r in rows}
    _, children = mlflow_runs(uri, experiment)
    ended = [c for c in children if c.info.status in ("FINISHED", "FAILED")]
    assert len(ended) == len(rows)
    for c in ended:
        row = by_number[int(c.data.tags["trial"])]
        for name in params:
            assert float(c.data.params[name]) == row["candidate"][name], (name, c.data.params)
        for name in metrics:
            assert float(c.data.metrics[name]) == row["metrics"][name], (name, c.data.metrics)


def export_runs(uri: str, experiment: str) -> list:
    """The export runs of an MLflow experiment (children of their sweep's parent run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {uri}"
    return client.search_runs([exp.experiment_id], filter_string="tags.`hwnas.role` = 'export'")


def copy_run(run_dir: Path, to: Path) -> Path:
    """A plain copy of a finished run folder (its records name files relative to it, so the copy reads
    its own trial files): a test can tamper with the copy without touching a run other tests read."""
    shutil.copytree(run_dir, to)
    return to


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh MLflow SQLite store under this test's tmp_path."""
    return f"sqlite:///{tmp_path}/mlflow.db"


# ---- a tiny NAS-Bench-201 table (2 ops on 6 edges: 64 cells) ----

NB201_OPS = ("nor_conv_3x3", "skip_connect")
NB201_METRICS = "objective.metrics=[{name: acc, mode: max}, {name: latency_ms, mode: min}]"


def nb201_cells(ops: Iterable[str] = NB201_OPS) -> list[dict[str, str]]:
    from hwnas.spaces.nb201 import EDGE_KEYS

    ops = list(ops)
    return [dict(zip(EDGE_KEYS, combo, strict=True)) for combo in itertools.product(ops, repeat=len(EDGE_KEYS))]


def make_nb201_table(path: Path, drop: int = 0, without: Iterable[str] = ()) -> Any:
    """Every cell of the 2-op space with random numbers, minus the first `drop` cells and the arch
    strings in `without`; written as CSV or Parquet by `path`'s suffix. Returns the DataFrame."""
    import numpy as np
    import pandas as pd

    from hwnas.spaces.nb201 import to_arch_string

    rng = np.random.default_rng(0)
    cells = nb201_cells()
    frame = pd.DataFrame({
        "arch": [to_arch_string(c) for c in cells],
        "acc": rng.uniform(10, 95, len(cells)).round(3),
        "latency_ms": rng.uniform(0.2, 5.0, len(cells)),
        "params": rng.integers(1000, 100000, len(cells)),
        "note": "synthetic",  # not numeric: not a metric
    }).iloc[drop:]
    frame = frame[~frame["arch"].isin(set(without))]
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return frame


# ---- what accelerator this machine has: tests that expect CUDA to be refused skip where it exists ----


@functools.cache
def ort_has_cuda() -> bool:
    """This onnxruntime build has the CUDA execution provider (hardware=cuda can run)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@functools.cache
def torch_has_cuda() -> bool:
    """torch sees a CUDA device (evaluator.accelerator=cuda can train). Imports torch."""
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU is visible to this machine: Ray would count it (runner.resources.gpu can be met)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return False
