"""The scheduler config group (conf/scheduler/) through the real `hwnas` command: each bad setting is refused
before any work with exit status 2 and one line naming the key and what is allowed, and nothing is written; and
a small MO-ASHA sweep runs to its end with trials.csv's `epochs` agreeing with trials.jsonl and rungs.jsonl."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import NB201_METRICS, NB201_OPS, hwnas, make_nb201_table, output_of, read_jsonl

# (overrides, what the error line must say: the key and value it names, and what is allowed). The default
# experiment trains (the pipeline, evaluator.epochs 6); scheduler=moasha has rungs [1, 2].
MOASHA = "scheduler=moasha"
ALLOWED_RUNGS = "allowed: a non-empty list of epochs, integers >= 1, increasing"
BAD = [
    ([MOASHA, "scheduler.rungs=[9]"], "scheduler.rungs: 9 is beyond evaluator.epochs (6)", "allowed: rung epochs <= 6"),
    ([MOASHA, "scheduler.rungs=[3]", "evaluator.epochs=2"], "scheduler.rungs: 3 is beyond evaluator.epochs (2)",
     "allowed: rung epochs <= 2"),
    ([MOASHA, "evaluator.epochs=1"], "scheduler.rungs: 2 is beyond evaluator.epochs (1)", "allowed: rung epochs <= 1"),
    ([MOASHA, "scheduler.rungs=[2,1]"], "scheduler.rungs[1]: 1 is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=[1,1]"], "scheduler.rungs[1]: 1 is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=[0]"], "scheduler.rungs[0]: 0 is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=[1.5]"], "scheduler.rungs[0]: 1.5 is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=[1,two]"], "scheduler.rungs[1]: 'two' is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=[true]"], "scheduler.rungs[0]: True is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=[]"], "scheduler.rungs: [] is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.rungs=3"], "scheduler.rungs: 3 is not allowed", ALLOWED_RUNGS),
    ([MOASHA, "scheduler.reduction_factor=1"], "scheduler.reduction_factor: 1 is not allowed",
     "allowed: a finite number > 1"),
    ([MOASHA, "scheduler.reduction_factor=0.5"], "scheduler.reduction_factor: 0.5 is not allowed",
     "allowed: a finite number > 1"),
    ([MOASHA, "scheduler.reduction_factor=three"], "scheduler.reduction_factor: 'three' is not allowed",
     "allowed: a finite number > 1"),
    ([MOASHA, "scheduler.reduction_factor=nan"], "scheduler.reduction_factor: nan is not a finite number",
     "allowed: a finite number"),
    ([MOASHA, "scheduler.tie_break=foo"], "scheduler.tie_break: 'foo' is not allowed", "allowed: eps_net, crowding"),
    ([MOASHA, "scheduler.latency_first=maybe"], "scheduler.latency_first: 'maybe' is not allowed",
     "allowed: true or false"),
    (["scheduler.latency_first=maybe"], "scheduler.latency_first: 'maybe' is not allowed", "allowed: true or false"),
    (["scheduler.latency_first=1"], "scheduler.latency_first: 1 is not allowed", "allowed: true or false"),
    ([MOASHA, "scheduler.rungs=[9]", "+space.train={epochs:[2,3]}"],
     "scheduler.rungs: 9 is beyond the largest space.train.epochs (3)", "allowed: rung epochs <= 3"),
    ([MOASHA, "scheduler.rungs=[9]", "+space.train={epochs:{low:2,high:4}}"],
     "scheduler.rungs: 9 is beyond the largest space.train.epochs (4)", "allowed: rung epochs <= 4"),
    ([MOASHA, "+scheduler.directions=[max]"], "scheduler.directions: set by hwnas", "allowed: leave it out"),
    (["scheduler=asha"], "scheduler=asha: unknown choice", "allowed: full, moasha"),
    ([MOASHA, "+scheduler.eta=3"], "scheduler.eta: unknown key", "reduction_factor, rungs, tie_break"),
    (["scheduler.rungs=[1]"], "scheduler.rungs: unknown key", "allowed: the keys of conf/scheduler/"),
    # MO-ASHA ranks by the objectives at a rung: only accuracy and what the untrained file gives are known there
    ([MOASHA, "objective.metrics=[{name: float_val_accuracy, mode: max}, {name: latency_ms, mode: min}]"],
     "objective.metrics[0].name: 'float_val_accuracy' is not known at a rung", "allowed: val_accuracy, energy_j"),
]


def assert_refused(proc, says: str, allowed: str, tmp_path: Path, before: set[Path]) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, output_of(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hwnas: error: " + says), lines[0]
    assert allowed in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""
    assert set(tmp_path.iterdir()) == before  # no run folder, no latency cache, no MLflow store


@pytest.mark.parametrize(("args", "says", "allowed"), [pytest.param(a, s, al, id=" ".join(a)) for a, s, al in BAD])
def test_bad_scheduler_setting_one_line_exit_2_nothing_written(tmp_path: Path, args: list[str], says: str,
                                                               allowed: str) -> None:
    proc = hwnas(*args, f"run_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path}/m.db", timeout=120)
    assert_refused(proc, says, allowed, tmp_path, set())


def test_moasha_with_an_evaluator_that_does_not_train_is_refused(tmp_path: Path) -> None:
    """A table look-up reports no epochs: nothing to stop between them."""
    table = tmp_path / "t.csv"
    make_nb201_table(table)
    before = set(tmp_path.iterdir())
    proc = hwnas("experiment=nb201_tabular", f"evaluator.table={table}", f"space.ops=[{','.join(NB201_OPS)}]",
                 NB201_METRICS, MOASHA, f"run_dir={tmp_path / 'run'}", timeout=120)
    assert_refused(proc, "scheduler: hwnas.search.schedulers.moasha.MOASHA stops trials between training epochs, "
                   "and hwnas.evaluators.tabular.TabularEvaluator does not train", "allowed: scheduler=full",
                   tmp_path, before)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # TPE's `group`, on building
def test_a_rung_at_the_last_epoch_is_accepted_as_the_end_of_training(tmp_path: Path) -> None:
    # As Syne Tune's max_t rung (and the issue's [1, 3, 9] with 9 epochs): allowed, never a judgment (the pipeline
    # reports only rungs below its epochs). In-process, up to build_experiment: the CLI would run a whole sweep.
    from hwnas.search.config import compose_config, validate
    from hwnas.search.experiment import build_experiment

    cfg = compose_config([MOASHA, "scheduler.rungs=[1,6]", f"run_dir={tmp_path / 'run'}", "tracking.enabled=false"])
    validate(cfg)
    assert build_experiment(cfg).sweep.scheduler.rungs == (1, 6)


def test_a_small_moasha_sweep_runs_and_records_epochs(tmp_path: Path) -> None:
    """About 20 s on two busy cores. Which trials stop depends on measured latency, so the checks hold for any
    outcome: every record agrees with the others."""
    run_dir = tmp_path / "run"
    proc = hwnas("experiment=smoke", "runner=local", MOASHA, "n_trials=6", "tracking.enabled=false",
                 f"run_dir={run_dir}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    rows = read_jsonl(run_dir / "trials.jsonl")
    assert sorted(r["number"] for r in rows) == list(range(6))
    assert {r["status"] for r in rows} <= {"COMPLETE", "STOPPED"}  # no budget: nothing rejected, nothing failed
    with open(run_dir / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert table and "epochs" in table[0]  # the pipeline reports train_epochs: the column is there, stops or not
    epochs = {int(r["number"]): int(r["epochs"]) for r in table}
    records = [json.loads(line) for line in (run_dir / "rungs.jsonl").read_text().splitlines()]
    assert max(Counter((r["key"], r["epoch"]) for r in records).values()) == 1
    decided = {(r["key"], r["epoch"]): r["keep"] for r in records}
    for r in rows:
        if r["status"] == "STOPPED":  # stopped at its rung: recorded stop there, kept at every rung before
            assert epochs[r["number"]] == r["epochs"] in (1, 2) and r["feasible"] is False
            assert decided[(r["arch_id"], r["epochs"])] is False
            assert all(decided[(r["arch_id"], e)] for e in (1, 2) if e < r["epochs"])
        else:  # smoke trains 3 epochs; kept at both rungs
            assert epochs[r["number"]] == 3 == r["metrics"]["train_epochs"]
            assert decided[(r["arch_id"], 1)] and decided[(r["arch_id"], 2)]
    assert len(records) == sum(1 if r["status"] == "STOPPED" and r["epochs"] == 1 else 2 for r in rows)
    stopped = sum(r["status"] == "STOPPED" for r in rows)
    trained = sum(epochs.values())
    summary = f"6 trials (0 failed, {stopped} stopped early, 0 rejected before training; {trained} of 18 training"
    out = proc.stdout + proc.stderr
    assert (summary in out) if stopped else ("6 trials (0 failed), front of" in out), out[-2000:]
