"""SIGKILL the driver mid-sweep, resume: exactly N trials in trials.csv, in Optuna and in MLflow.

Real processes: the sweep runs under Ray in a child process group that the test kills with SIGKILL
(driver, Ray and trial workers alike, as a lost machine would), then `resume=true` finishes it.
The kill lands while a trial is running (waited for, then checked in what the dead driver left:
its Optuna journal and MLflow), so the resume has an interrupted trial to queue again.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import hwnas, kill_when, mlflow_runs, output_of, read_jsonl

from hwnas.search.study_record import INTERRUPTED, evaluated_trials
from hwnas.search.sweep_state import SweepState, journal_storage
from hwnas.spaces.candidate import arch_id


def _running_unrecorded(uri: str, run_dir: Path) -> set[int]:
    """Trials whose MLflow child run is RUNNING and that trials.jsonl does not hold yet: mid-evaluation."""
    try:
        _, children = mlflow_runs(uri, "hwnas-smoke")
    except Exception:  # the store or the experiment is not there yet
        return set()
    recorded = {r["number"] for r in read_jsonl(run_dir / "trials.jsonl")}
    return {int(c.data.tags["trial"]) for c in children if c.info.status == "RUNNING"} - recorded


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
    # Two trials recorded, and one (or more) running right now: kill then.
    kill_when(args, lambda: len(read_jsonl(run_dir / "trials.jsonl")) >= 2 and _running_unrecorded(uri, run_dir),
              "trial seen running after two had finished")
    before = read_jsonl(run_dir / "trials.jsonl")
    recorded_before = {r["number"] for r in before}
    assert 2 <= len(before) < n

    # What the dead driver left says a trial was running at the kill: RUNNING in its Optuna journal
    # and in MLflow, with no record in trials.jsonl.
    state = SweepState.load(run_dir)
    study = optuna.load_study(study_name=state.study_name, storage=journal_storage(run_dir))
    running_at_kill = {t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING} - recorded_before
    assert running_at_kill, "the kill landed between trials"
    mlflow_running_at_kill = _running_unrecorded(uri, run_dir)
    assert mlflow_running_at_kill and mlflow_running_at_kill <= running_at_kill

    # A changed search config is refused, naming the key; nothing is touched.
    refused = hwnas(*args, "resume=true", "seed=7")
    assert refused.returncode == 2 and "seed" in refused.stderr
    assert read_jsonl(run_dir / "trials.jsonl") == before

    done = hwnas(*args, "resume=true", timeout=600)
    assert done.returncode == 0, output_of(done)
    # The resume found exactly the trials recorded and the ones cut short.
    found = re.search(r"resuming .*: (\d+) trials done, (\d+) interrupted trial\(s\) queued again", done.stdout)
    assert found, done.stdout[-3000:]
    assert (int(found[1]), int(found[2])) == (len(before), len(running_at_kill))

    # trials.csv: exactly N, each trial number once, the ones from before the kill unchanged.
    rows = read_jsonl(run_dir / "trials.jsonl")
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n == len(rows)
    assert trials["number"].is_unique
    assert rows[: len(before)] == before

    # Optuna: the same N evaluations; every trial completed before the kill is in the study with its values.
    assert SweepState.load(run_dir).parent_run_id == state.parent_run_id
    study = optuna.load_study(study_name=state.study_name, storage=journal_storage(run_dir))
    evaluated = evaluated_trials(study)
    assert sorted(t.number for t in evaluated) == sorted(trials["number"])
    by_number = {t.number: t for t in study.trials}
    for row in before:
        t = by_number[row["number"]]
        if row["status"] == "COMPLETE":
            assert t.values == [row["metrics"]["val_accuracy"], row["metrics"]["latency_ms"]]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = {t.number for t in study.trials if INTERRUPTED in t.user_attrs}
    # exactly the trials running at the kill were interrupted; none of them is counted, each was
    # evaluated again after the resume under a new number
    assert interrupted == running_at_kill
    assert not interrupted & set(trials["number"])
    assert len(evaluated) == n
    after = [r for r in rows if r["number"] not in recorded_before]
    assert {arch_id(by_number[k].params) for k in interrupted} <= {r["arch_id"] for r in after}

    # MLflow: one parent (the same one), N finished child runs, exactly the ones running at the kill
    # KILLED, nothing RUNNING.
    parents, children = mlflow_runs(uri, "hwnas-smoke")
    assert [p.info.run_id for p in parents] == [state.parent_run_id]
    assert parents[0].info.status == "FINISHED"
    ended = [c for c in children if c.info.status in ("FINISHED", "FAILED")]
    assert sorted(int(c.data.tags["trial"]) for c in ended) == sorted(trials["number"])
    assert all(c.info.status in ("FINISHED", "FAILED", "KILLED") for c in children)
    killed = sorted(int(c.data.tags["trial"]) for c in children if c.info.status == "KILLED")
    assert killed == sorted(mlflow_running_at_kill)
    assert len(children) == n + len(killed)
