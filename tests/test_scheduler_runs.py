"""Early stopping in whole runs of the real `hwnas` command (issue 14): what each record says of a trial the
scheduler ended, and that the records agree with one another.

- MO-ASHA on Ray (BrokerScheduler over tune.report): STOPPED rows <-> keep=false records in rungs.jsonl, PRUNED in
  the Optuna study, one MLflow child run each, never a model file, never on the front, never exported.
- Latency-first on a deterministic budget (model_bytes, runner=local): exactly the candidates whose untrained file
  is over it are REJECTED, untrained, without a model file; the others train.
- A driver SIGKILLed while a trial trains past its rung, then resumed: the decision made before the kill is
  replayed, not taken again; the killed trial is INTERRUPTED once and run again; every count agrees.

Which trials MO-ASHA stops depends on measured latency (one of the two objectives), so the checks hold for any
outcome; the seeds and sizes make the interesting outcomes (some stopped, some rejected, a kept trial to kill)
happen on the machines these tests were written on.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import (
    assert_trial_runs_match,
    hwnas,
    kill_when,
    mlflow_runs,
    output_of,
    read_jsonl,
)

from hwnas.search.study_record import DUPLICATE, INTERRUPTED, evaluated_trials
from hwnas.search.sweep_state import SweepState, journal_storage

PRUNED, COMPLETE, FAIL = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def _study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=SweepState.load(run_dir).study_name, storage=journal_storage(run_dir))


def _trial_file(run_dir: Path, number: int, name: str = "model.onnx") -> Path:
    return run_dir / "trials" / f"{number:04d}" / name


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_rung_records(rows: list[dict[str, Any]], records: list[dict[str, Any]], rungs: tuple[int, ...],
                        epochs: int) -> None:
    """What every MO-ASHA run must show, however the decisions fell: one record per (arch, rung); a STOPPED row
    for exactly each keep=false record (same trial number, `epochs` = the rung), kept at every rung before it; a
    COMPLETE row trained in full and kept at every rung."""
    assert max(Counter((r["key"], r["epoch"]) for r in records).values()) == 1, records
    assert {r["epoch"] for r in records} <= set(rungs)
    stopped_rows = {(r["number"], r["epochs"]) for r in rows if r["status"] == "STOPPED"}
    stop_records = {(r["number"], r["epoch"]) for r in records if not r["keep"]}
    assert stopped_rows == stop_records
    decided = {(r["key"], r["epoch"]): r["keep"] for r in records}
    for r in rows:
        if r["status"] == "STOPPED":
            assert r["epochs"] in rungs and r["feasible"] is False and r["artifact"] is None
            assert r["error"].startswith(f"stopped at epoch {r['epochs']}")
            assert "val_accuracy" not in r["metrics"] and "rung_val_accuracy" in r["metrics"]
            assert all(decided[(r["arch_id"], e)] for e in rungs if e < r["epochs"])
        else:
            assert r["status"] == "COMPLETE", r
            assert r["metrics"]["train_epochs"] == epochs
            assert all(decided[(r["arch_id"], e)] for e in rungs)


# ---- 1. MO-ASHA on Ray, tracked in MLflow ----

RAY_N, RAY_EPOCHS, RAY_RUNGS = 9, 4, (1, 2)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_moasha_on_ray_stopped_trials_agree_in_every_record(tmp_path: Path, mlflow_uri: str) -> None:
    """About 40-55 s on two busy cores (Ray's start-up is much of it)."""
    run_dir = tmp_path / "run"
    proc = hwnas("experiment=smoke", "runner=ray", "runner.max_concurrent=2", "scheduler=moasha",
                 f"n_trials={RAY_N}", f"evaluator.epochs={RAY_EPOCHS}", f"scheduler.rungs=[{','.join(map(str, RAY_RUNGS))}]",
                 "seed=0", f"tracking.uri={mlflow_uri}", f"run_dir={run_dir}", timeout=600)
    assert proc.returncode == 0, output_of(proc)

    rows = read_jsonl(run_dir / "trials.jsonl")
    numbers = [r["number"] for r in rows]
    assert len(rows) == RAY_N and sorted(numbers) == sorted(set(numbers))
    stopped = {r["number"] for r in rows if r["status"] == "STOPPED"}
    complete = {r["number"] for r in rows if r["status"] == "COMPLETE"}
    assert stopped, "no trial was stopped at a rung: the test shows nothing"
    assert complete, "every trial was stopped"  # the first trial at a rung always goes on
    assert stopped | complete == set(numbers)  # no budget: nothing rejected; nothing failed
    records = read_jsonl(run_dir / "rungs.jsonl")
    check_rung_records(rows, records, RAY_RUNGS, RAY_EPOCHS)

    # No model file, never on the front, never exported; trials.csv says where each stopped trial stopped.
    for n in stopped:
        assert not _trial_file(run_dir, n).exists() and not _trial_file(run_dir, n, "model_fp32.onnx").exists()
    for n in complete:
        assert _trial_file(run_dir, n).is_file()
    front = {int(r["number"]) for r in _csv(run_dir / "pareto.csv")}
    assert front and front <= complete
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["candidate"]["trial"] in complete
    table = {int(r["number"]): r for r in _csv(run_dir / "trials.csv")}
    by_number = {r["number"]: r for r in rows}
    for n, r in table.items():
        assert int(r["epochs"]) == (by_number[n]["epochs"] if n in stopped else RAY_EPOCHS)
        assert (r["status"] == "STOPPED") == (n in stopped) and (r["pareto"] == "True") == (n in front)

    # Optuna: PRUNED for exactly the stopped trials, COMPLETE for the others (duplicates answered apart).
    study = _study(run_dir)
    evaluated = {t.number: t for t in evaluated_trials(study)}
    assert sorted(evaluated) == sorted(numbers)
    assert {n for n, t in evaluated.items() if t.state == PRUNED} == stopped
    assert {n for n, t in evaluated.items() if t.state == COMPLETE} == complete
    assert all(t.state == PRUNED for t in study.trials if DUPLICATE in t.user_attrs
               and t.user_attrs[DUPLICATE] in {by_number[n]["arch_id"] for n in stopped})

    # MLflow: one ended child run per trial (conftest's helper counts FINISHED and FAILED: a stopped trial's run
    # ended FINISHED, it ran as scheduled), its status tag the row's, no model file for a stopped one, and the
    # parent's totals.
    assert_trial_runs_match(mlflow_uri, "hwnas-smoke", rows, params=["n_stages", "prune_ratio"],
                            metrics=["latency_ms", "model_bytes"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    parents, children = mlflow_runs(mlflow_uri, "hwnas-smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(c.data.tags["trial"]) for c in children) == sorted(numbers)  # one each, nothing left RUNNING
    for c in children:
        n, row = int(c.data.tags["trial"]), by_number[int(c.data.tags["trial"])]
        assert c.info.status == "FINISHED" and c.data.tags["status"] == row["status"]
        files = [a.path for a in client.list_artifacts(c.info.run_id)]
        if n in stopped:
            assert c.data.tags["feasible"] == "false" and c.data.tags["pareto"] == "false"
            assert c.data.tags["error"].startswith(f"stopped at epoch {row['epochs']}")
            assert c.data.metrics["rung_val_accuracy"] == row["metrics"]["rung_val_accuracy"]
            assert c.data.metrics["epochs"] == row["epochs"]  # the epochs it trained, as trials.csv says
            assert c.data.metrics["time/train_s"] > 0 and row["metrics"]["train_s"] > 0  # what it cost up to its rung
            assert "val_accuracy" not in c.data.metrics
            assert not [f for f in files if f.endswith(".onnx")], files
        else:
            assert "model.onnx" in files
    spent = len(complete) * RAY_EPOCHS + sum(by_number[n]["epochs"] for n in stopped)
    assert parents[0].data.metrics["n_stopped"] == len(stopped)
    assert parents[0].data.metrics["n_rejected"] == 0
    assert parents[0].data.metrics["epochs_trained"] == spent
    assert f"{spent} of {RAY_N * RAY_EPOCHS} training epochs" in proc.stdout + proc.stderr


# ---- 2. Latency-first on a model_bytes budget ----

LF_N = 8
# seed 0's first 8 smoke candidates make files of about 4.6, 6.7, 7.4, 9.2, 9.9, 11.2, 16.4 and 38 kB: 10.5 kB
# leaves a margin of more than 500 bytes either side (an int8 file made from untrained weights can differ from
# the trained one by a few bytes).
LF_BUDGET = 10500


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_latency_first_rejects_exactly_the_candidates_over_a_size_budget_before_training(tmp_path: Path) -> None:
    """About 15-30 s on two busy cores."""
    run_dir = tmp_path / "run"
    proc = hwnas("experiment=smoke", "runner=local", f"n_trials={LF_N}", "seed=0", "tracking.enabled=false",
                 f"+objective.budgets.model_bytes={LF_BUDGET}", f"run_dir={run_dir}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    rows = read_jsonl(run_dir / "trials.jsonl")
    assert len(rows) == LF_N and len({r["number"] for r in rows}) == LF_N
    over = {r["number"] for r in rows if r["metrics"]["model_bytes"] > LF_BUDGET}
    rejected = {r["number"] for r in rows if r["status"] == "REJECTED"}
    assert rejected == over
    assert rejected and len(rejected) < LF_N, "the budget should split the candidates"
    assert not (run_dir / "rungs.jsonl").exists()  # scheduler=full: no rung, no decision

    study = _study(run_dir)
    by_trial = {t.number: t for t in evaluated_trials(study)}
    assert sorted(by_trial) == sorted(r["number"] for r in rows)
    for r in rows:
        n, metrics, t = r["number"], r["metrics"], by_trial[r["number"]]
        if n in rejected:
            # Never trained: epochs 0, no training step clocked, no training epochs; the untrained file stays.
            assert r["epochs"] == 0 and r["feasible"] is False and r["artifact"] is None
            assert "train_s" not in metrics and "train_epochs" not in metrics and "val_accuracy" not in metrics
            assert metrics["train_epochs_full"] == 3  # smoke's evaluator.epochs: what it would have trained
            assert metrics["early_s"] > 0 and metrics["build_s"] > 0  # what the rejection cost
            assert r["error"] == ("rejected before training, its untrained file over budget: "
                                  f"model_bytes {metrics['model_bytes']:.6g} > {LF_BUDGET}")
            assert not _trial_file(run_dir, n).exists() and _trial_file(run_dir, n, "model_early.onnx").is_file()
            # Told COMPLETE with the placeholder accuracy and a violated constraint (trial_outcome.py).
            assert t.state == COMPLETE and t.values[0] == 0.0 and max(t.constraints.values()) > 0
        else:
            assert r["status"] == "COMPLETE" and r["feasible"] is True, r
            assert metrics["train_epochs"] == 3 and metrics["train_s"] > 0 and "epochs" not in r
            assert _trial_file(run_dir, n).is_file() and r["artifact"] == f"trials/{n:04d}/model.onnx"
            assert t.state == COMPLETE and max(t.constraints.values()) <= 0
    table = {int(r["number"]): r for r in _csv(run_dir / "trials.csv")}
    assert {n for n, r in table.items() if r["status"] == "REJECTED"} == rejected
    assert all(int(table[n]["epochs"]) == (0 if n in rejected else 3) for n in table)
    assert all(table[n]["val_accuracy"] == "" for n in rejected)  # the placeholder 0 is only in the study
    front = {int(r["number"]) for r in _csv(run_dir / "pareto.csv")}
    assert front and not front & rejected
    assert json.loads((run_dir / "export" / "model_card.json").read_text())["candidate"]["trial"] not in rejected
    trained = 3 * (LF_N - len(rejected))
    summary = (f"{LF_N} trials (0 failed, 0 stopped early, {len(rejected)} rejected before training; "
               f"{trained} of {3 * LF_N} training epochs")
    assert summary in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


# ---- 3. SIGKILL while a trial trains past its rung, then resume ----

RESUME_N, RESUME_EPOCHS = 8, 10  # 9 epochs after the rung: a window of about a second to land the kill in


def _kept_unrecorded(run_dir: Path) -> set[int]:
    """Trials kept at a rung (a keep=true record) that trials.jsonl does not hold yet: training past the rung."""
    recorded = {r["number"] for r in read_jsonl(run_dir / "trials.jsonl")}
    return {r["number"] for r in read_jsonl(run_dir / "rungs.jsonl") if r["keep"]} - recorded


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_kill_mid_rung_then_resume_replays_the_decision_and_counts_once(tmp_path: Path) -> None:
    """About 25-35 s on two busy cores."""
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "runner=local", "scheduler=moasha", "scheduler.rungs=[1]",
            f"evaluator.epochs={RESUME_EPOCHS}", f"n_trials={RESUME_N}", "seed=0", "tracking.enabled=false",
            f"run_dir={run_dir}"]
    # A trial recorded already (the resume has history to restore), and one kept at its rung still training.
    kill_when(args, lambda: read_jsonl(run_dir / "trials.jsonl") and _kept_unrecorded(run_dir),
              "trial kept at its rung and still training", poll=0.01)
    before = read_jsonl(run_dir / "trials.jsonl")
    records_before = read_jsonl(run_dir / "rungs.jsonl")
    killed = _kept_unrecorded(run_dir)
    assert len(killed) == 1, f"the kill should land while one trial trains past its rung: {killed}"
    (killed_number,) = killed
    killed_key = next(r["key"] for r in records_before if r["number"] == killed_number)
    assert 1 <= len(before) < RESUME_N
    running = {t.number for t in _study(run_dir).trials if t.state == optuna.trial.TrialState.RUNNING}
    assert running == killed  # runner=local: one trial at a time

    done = hwnas(*args, "resume=true", timeout=600)
    assert done.returncode == 0, output_of(done)
    out = done.stdout + done.stderr
    found = re.search(r"resuming .*: (\d+) trials done, (\d+) interrupted trial\(s\) queued again", out)
    assert found and (int(found[1]), int(found[2])) == (len(before), 1), out[-3000:]

    # trials.jsonl: exactly N, each number once, the rows from before the kill unchanged; the killed trial has no
    # row, its candidate ran again under a new number and trained in full (its recorded keep replayed).
    rows = read_jsonl(run_dir / "trials.jsonl")
    numbers = [r["number"] for r in rows]
    assert len(rows) == RESUME_N and len(set(numbers)) == RESUME_N
    assert rows[: len(before)] == before
    assert killed_number not in numbers
    rerun = [r for r in rows if r["arch_id"] == killed_key]
    assert len(rerun) == 1 and rerun[0]["number"] > killed_number and rerun[0]["status"] == "COMPLETE"
    assert rerun[0]["metrics"]["train_epochs"] == RESUME_EPOCHS

    # rungs.jsonl: the records from before the kill unchanged, the killed trial's decision not taken again (one
    # record per (key, rung), the replayed one under the killed trial's number); every trial reached rung 1.
    records = read_jsonl(run_dir / "rungs.jsonl")
    assert records[: len(records_before)] == records_before
    assert [r for r in records if r["key"] == killed_key] == [r for r in records_before if r["key"] == killed_key]
    assert len(records) == RESUME_N and {r["key"] for r in records} == {r["arch_id"] for r in rows}
    check_rung_records(rows, records, (1,), RESUME_EPOCHS)

    # Optuna: the N evaluations; PRUNED for exactly the stopped ones; the killed trial FAIL + INTERRUPTED, once.
    study = _study(run_dir)
    evaluated = {t.number: t for t in evaluated_trials(study)}
    stopped = {r["number"] for r in rows if r["status"] == "STOPPED"}
    assert sorted(evaluated) == sorted(numbers)
    assert {n for n, t in evaluated.items() if t.state == PRUNED} == stopped
    interrupted = [t for t in study.trials if INTERRUPTED in t.user_attrs]
    assert [t.number for t in interrupted] == [killed_number] and interrupted[0].state == FAIL
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]

    # Epochs: a stopped trial trained to its rung, a finished one in full, the killed one is not counted; the
    # summary line and trials.csv say the same.
    spent = sum(r["epochs"] if r["status"] == "STOPPED" else r["metrics"]["train_epochs"] for r in rows)
    assert spent == len(stopped) * 1 + (RESUME_N - len(stopped)) * RESUME_EPOCHS
    assert sum(int(r["epochs"]) for r in _csv(run_dir / "trials.csv")) == spent
    if stopped:
        assert f"{spent:g} of {RESUME_N * RESUME_EPOCHS} training epochs" in out, out[-2000:]
