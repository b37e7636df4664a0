"""SIGKILL the driver mid-sweep, resume: exactly N trials in trials.csv, in Optuna and in MLflow.

Real processes: the sweep runs under Ray in a child process group that the test kills with SIGKILL
(driver, Ray and trial workers alike, as a lost machine would), then `resume=true` finishes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hwnas.search.study_record import INTERRUPTED, evaluated_trials
from hwnas.search.sweep_state import SweepState, journal_storage

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from hwnas.search.cli import main; sys.exit(main())"]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["ray", "local"])
def test_kill_driver_then_resume(tmp_path: Path, runner: str) -> None:
    n = 8
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    # 20 epochs: trials of a second or more, so the kill lands mid-sweep however fast the machine is.
    args = ["experiment=smoke", "evaluator.epochs=20", f"runner={runner}", f"n_trials={n}", "search=tpe",
            f"run_dir={run_dir}", f"tracking.uri={uri}"]
    if runner == "ray":
        args.append("runner.max_concurrent=2")
    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_lines(run_dir / "trials.jsonl")) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.05)
        time.sleep(0.3)  # land the kill while the next trials are running
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _lines(run_dir / "trials.jsonl")
    assert 2 <= len(before) < n

    # A changed search config is refused, naming the key; nothing is touched.
    refused = subprocess.run([*CLI, *args, "resume=true", "seed=7"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "seed" in refused.stderr
    assert _lines(run_dir / "trials.jsonl") == before

    done = subprocess.run([*CLI, *args, "resume=true"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # trials.csv: exactly N, each trial number once, the ones from before the kill unchanged.
    rows = _lines(run_dir / "trials.jsonl")
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n == len(rows)
    assert trials["number"].is_unique
    assert rows[: len(before)] == before

    # Optuna: the same N evaluations; every trial completed before the kill is in the study with its values.
    state = SweepState.load(run_dir)
    study = optuna.load_study(study_name=state.study_name, storage=journal_storage(run_dir))
    evaluated = evaluated_trials(study)
    assert sorted(t.number for t in evaluated) == sorted(trials["number"])
    by_number = {t.number: t for t in study.trials}
    for row in before:
        t = by_number[row["number"]]
        if row["status"] == "COMPLETE":
            assert t.values == [row["metrics"]["val_accuracy"], row["metrics"]["latency_ms"]]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = [t for t in study.trials if INTERRUPTED in t.user_attrs]
    # each interrupted candidate was evaluated again after the resume (retried, never both missing and counted)
    for t in interrupted:
        assert t.number not in set(trials["number"])

    # MLflow: one parent (the same one), N finished child runs, the killed ones KILLED, nothing RUNNING.
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("hwnas-smoke").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [state.parent_run_id]
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    ended = [c for c in children if c.info.status in ("FINISHED", "FAILED")]
    assert sorted(int(c.data.tags["trial"]) for c in ended) == sorted(trials["number"])
    assert all(c.info.status in ("FINISHED", "FAILED", "KILLED") for c in children)
    killed = {int(c.data.tags["trial"]) for c in children if c.info.status == "KILLED"}
    assert killed <= {t.number for t in interrupted}
