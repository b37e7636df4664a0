"""Early stopping and latency-first with every sampler: a real sweep per sampler (local runner, generated data) in
which MO-ASHA stops trials at rungs and a model_bytes budget rejects candidates before training. Each must finish,
record both kinds, tell Optuna what trial_outcome.py says (STOPPED -> PRUNED, REJECTED -> COMPLETE with a violated
constraint, placeholder accuracy 0), and keep both off the front."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
from conftest import hwnas, output_of, read_jsonl

from hwnas.search.study_record import DUPLICATE
from hwnas.search.sweep_state import SweepState, journal_storage

N_TRIALS = 8
BUDGET_BYTES = 9000  # smoke's files run from about 3 kB to 16 kB: some over, some under


@pytest.mark.slow
@pytest.mark.parametrize("search", ["tpe", "nsga2", "gp", "evolution", "rl", "random"])
def test_every_sampler_runs_with_moasha_and_latency_first(tmp_path: Path, search: str) -> None:
    run_dir = tmp_path / "run"
    proc = hwnas("experiment=smoke", "runner=local", "scheduler=moasha", f"search={search}", f"n_trials={N_TRIALS}",
                 "seed=1", "tracking.enabled=false", f"+objective.budgets.model_bytes={BUDGET_BYTES}",
                 f"run_dir={run_dir}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    rows = read_jsonl(run_dir / "trials.jsonl")
    numbers = [r["number"] for r in rows]
    assert len(rows) == N_TRIALS and len(set(numbers)) == N_TRIALS  # repeats are answered, not rows
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("COMPLETE", "STOPPED", "REJECTED", "FAILED")}
    assert not by_status["FAILED"], [r["error"] for r in by_status["FAILED"]]
    assert by_status["REJECTED"] or by_status["STOPPED"], "neither a rejection nor a stop: the test shows nothing"
    for r in by_status["REJECTED"]:
        assert r["metrics"]["model_bytes"] > BUDGET_BYTES and r["epochs"] == 0 and not r["feasible"]
        assert f"model_bytes {r['metrics']['model_bytes']:.6g} > {BUDGET_BYTES}" in r["error"]  # why, in trials.csv
        assert not (run_dir / "trials" / f"{r['number']:04d}" / "model.onnx").exists()
    for r in rows:
        if r["status"] in ("COMPLETE", "STOPPED"):
            assert r["metrics"]["model_bytes"] <= BUDGET_BYTES, r  # rejected before training, never trained

    study = optuna.load_study(study_name=SweepState.load(run_dir).study_name, storage=journal_storage(run_dir))
    # Row numbers are Optuna trial numbers; a repeat the broker answered is a trial of its own, marked a duplicate.
    number_of = {t.number: t for t in study.trials if DUPLICATE not in t.user_attrs}
    assert sorted(number_of) == sorted(r["number"] for r in rows)
    for r in by_status["STOPPED"]:
        assert number_of[r["number"]].state == optuna.trial.TrialState.PRUNED
    for r in by_status["REJECTED"]:
        t = number_of[r["number"]]
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.values[0] == 0.0  # the placeholder accuracy, only in the study
        assert max(t.constraints.values()) > 0
    for r in by_status["STOPPED"]:
        assert r["error"].startswith(f"stopped at epoch {r['epochs']}")
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in number_of.values())
    assert pruned == len(by_status["STOPPED"])

    with open(run_dir / "pareto.csv") as f:
        front = {int(r["number"]) for r in csv.DictReader(f)}
    assert front and front <= {r["number"] for r in by_status["COMPLETE"]}
