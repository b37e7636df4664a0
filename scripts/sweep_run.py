"""What the sweep benchmarks share: their `-- overrides`, running the default search as `make search`
does (a subprocess of this interpreter), reading its trial records, and naming the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hwnas.evaluators.measure.fingerprint import device_fingerprint

HWNAS = [sys.executable, "-c", "import sys; from hwnas.search.cli import run; sys.exit(run())"]


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, the hwnas overrides after `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def run_search(run_dir: Path, trials: int, overrides: Sequence[str], cwd: Path,
               env: Mapping[str, str] | None = None) -> float:
    """The default search into `run_dir` (MLflow off, 2 trials at a time) with `overrides`; its wall
    seconds. A failed sweep ends the benchmark with the tail of its stderr."""
    cmd = [*HWNAS, f"run_dir={run_dir}", "tracking.enabled=false", "runner.max_concurrent=2", f"n_trials={trials}",
           *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def trial_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The sweep's records, each trial's file as a path a benchmark can open (records keep it relative)."""
    from hwnas.search.trial_log import artifact_path

    rows = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines() if x.strip()]
    for row in rows:
        if row.get("artifact"):
            row["artifact"] = str(artifact_path(run_dir, row))
    return rows


def machine() -> dict[str, Any]:
    """The CPU every figure was taken on (device_fingerprint), and the load when the benchmark started."""
    fp = device_fingerprint("cpu")
    return {"cpu": fp["cpu_model"], "flags": fp["flags"], "cores": fp["logical_cores"],
            "onnxruntime": fp["onnxruntime"], "loadavg_start": os.getloadavg()}
