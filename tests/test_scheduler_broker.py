"""The broker's half of scheduling (search/broker.py): latency-first rejections at epoch 0, MO-ASHA stops at rung
epochs, repeats of ended candidates, the scheduler restored from rungs.jsonl on resume, and the schedule part of
the progress line, all with a real Optuna study (the sweep's journal in the run folder), a real Recorder and
TrialLog, the real MOASHA / FullTraining and the NAS-Bench-201 space on 2 ops (64 cells).

Trials report as the pipeline does (evaluators/pipeline.py): epoch 0 with the untrained file's figures and
train_epochs_full, each rung epoch with those and rung_val_accuracy. The rung-1 values below form a dominance chain
D > A > H > E > F > B > G > C > X, so every front is one point and MO-ASHA's decisions follow from
position * reduction_factor < judged (the top ceil(judged / 3) go on), by hand, whatever the tie-break.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import NB201_OPS, nb201_cells
from optuna.trial import TrialState

from hwnas.search.broker import Broker
from hwnas.search.objectives import Objectives
from hwnas.search.progress import Progress
from hwnas.search.recorder import Recorder
from hwnas.search.schedulers import MOASHA, FullTraining
from hwnas.search.schedulers.accounting import schedule_line, schedule_summary
from hwnas.search.study_record import DUPLICATE, INTERRUPTED, reconcile_study
from hwnas.search.sweep_state import journal_storage
from hwnas.search.trial_log import RUNGS_JSONL, TrialLog
from hwnas.spaces.candidate import arch_id
from hwnas.spaces.nb201 import NB201Space

optuna.logging.set_verbosity(optuna.logging.WARNING)

CELLS = nb201_cells()
FULL_EPOCHS = 6
LAT_BUDGET, BYTES_BUDGET = 3.0, 10000.0
# Accuracy up, latency down; budgets on two figures an untrained file gives (latency-first applies to both).
OBJ = Objectives(("val_accuracy", "latency_ms"), ("max", "min"),
                 {"latency_ms": ("upper", LAT_BUDGET), "model_bytes": ("upper", BYTES_BUDGET)})
BYTES = 5000.0  # every scheduled candidate's file size below: within budget

# name -> (cell, rung-1 (accuracy, latency), kept at rung 1), in the order judged: the chain of the module docstring.
RUNG1 = {
    "A": (CELLS[1], (0.90, 1.0), True),   # first at the rung: always goes on
    "B": (CELLS[2], (0.50, 2.0), False),  # behind A: position 1 of 2, 3 is not < 2
    "C": (CELLS[3], (0.40, 2.5), False),  # position 2 of 3
    "F": (CELLS[6], (0.80, 1.5), True),   # behind A only: position 1 of 4, 3 < 4, kept just inside the top third
    "D": (CELLS[4], (0.95, 0.5), True),   # dominates all: position 0 of 5
    "E": (CELLS[5], (0.82, 1.4), False),  # behind D, A: position 2 of 6, 2 * 3 = 6 is not < 6: stopped at the boundary
}
ORDER = list(RUNG1)
# rung 2, for the three kept: A first (kept), D ahead of A (kept), F behind both: position 2 of 3, stopped
RUNG2 = {"A": ((0.92, 1.0), True), "D": ((0.97, 0.5), True), "F": ((0.85, 1.5), False)}
X = (CELLS[7], (0.20, 2.95))  # dominated by every trial: position 6 of 7, stopped
G = (CELLS[8], (0.45, 2.2))  # behind D, A, E, F, B: position 5 of 8, stopped (alone at a rung it would go on)
H = (CELLS[9], (0.85, 1.2))  # behind D, A: position 2 of 9, kept (were only the kept A, F, D counted: 2 of 4, stopped)
REJECT = CELLS[10]
REJECTED_LATENCY = 4.5


def space() -> NB201Space:
    return NB201Space(ops=list(NB201_OPS), C=4, N=1, prune_ratios=[0.0], quant=["fp32"])


def moasha(**kwargs: Any) -> MOASHA:
    return MOASHA(**{"rungs": [1, 2], "reduction_factor": 3, "directions": list(OBJ.modes), **kwargs})


def early(latency: float, size: float = BYTES) -> dict[str, float]:
    """What the untrained file reports at epoch 0 (the pipeline's `_early` figures)."""
    return {"latency_ms": latency, "model_bytes": size, "params": 1234.0, "train_epochs_full": float(FULL_EPOCHS)}


def at_rung(acc: float, latency: float) -> dict[str, float]:
    return {**early(latency), "rung_val_accuracy": acc}


def done_metrics(acc: float, latency: float) -> dict[str, float]:
    return {"val_accuracy": acc, "latency_ms": latency, "model_bytes": BYTES, "train_epochs": float(FULL_EPOCHS)}


@pytest.fixture
def open_broker() -> Iterator[Any]:
    """open_broker(run_dir, scheduler, objectives=OBJ, n_trials=30): a Broker over the run folder (a resumed one when
    the folder holds a sweep already), as experiment.py builds it. Recorders are closed at the end of the test."""
    recorders: list[Recorder] = []

    def make(run_dir: Path, scheduler: Any, objectives: Objectives = OBJ, n_trials: int = 30,
             reconcile: bool = False) -> Broker:
        run_dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name="sched", sampler=optuna.samplers.RandomSampler(seed=0),
                                    directions=objectives.optuna_directions, storage=journal_storage(run_dir),
                                    load_if_exists=True)
        if reconcile:  # resume=true: the dead driver's open trials are finished or queued again first
            reconcile_study(study, TrialLog(run_dir).rows(), objectives)
        recorder = Recorder(run_dir, objectives, None, Progress(n_trials, stream=io.StringIO(), interval_s=3600), {})
        recorders.append(recorder)
        return Broker(study, space(), objectives, n_trials, recorder, scheduler=scheduler)

    yield make
    for r in recorders:
        r.close()


def start(broker: Broker, cell: dict[str, str]) -> int:
    """Queue `cell` and hand it out: its trial number (the broker answers no repeat in between)."""
    broker.study.enqueue_trial(cell)
    job = broker.next()
    assert job is not None and job[1] == cell
    broker.started(job[0])
    return job[0]


def rows_of(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["number"]: r for r in TrialLog(run_dir).rows()}


def rung_records(run_dir: Path) -> list[tuple[str, int, bool, list[float]]]:
    return [(r["key"], r["epoch"], r["keep"], r["values"]) for r in TrialLog(run_dir, RUNGS_JSONL).rows()]


def judge_rung_one(broker: Broker) -> dict[str, int]:
    """Start A..F, report epoch 0 (within budget) and rung 1; assert each decision. Returns name -> trial number."""
    numbers = {}
    for name in ORDER:
        cell, (acc, lat), keep = RUNG1[name]
        n = numbers[name] = start(broker, cell)
        assert broker.report(n, 0, early(lat)) is True
        assert broker.report(n, 1, at_rung(acc, lat)) is keep, name
    return numbers


# ---------------------------------------------------------------------------------------------- (a) latency-first


@pytest.mark.parametrize("scheduler", [lambda: FullTraining(latency_first=True, directions=["max", "min"]), moasha],
                         ids=["full", "moasha"])
@pytest.mark.parametrize(("latency", "size", "constraints"), [
    (REJECTED_LATENCY, BYTES, {"latency_ms": REJECTED_LATENCY - LAT_BUDGET, "model_bytes": BYTES - BYTES_BUDGET}),
    (1.0, 25000.0, {"latency_ms": 1.0 - LAT_BUDGET, "model_bytes": 25000.0 - BYTES_BUDGET}),
], ids=["over-latency", "over-model_bytes"])
def test_over_a_pre_training_budget_at_epoch_0_is_rejected_recorded_and_told_complete_infeasible(
        tmp_path: Path, open_broker: Any, scheduler: Any, latency: float, size: float, constraints: dict) -> None:
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, scheduler())
    assert broker.reports  # a budget an untrained file gives: trials report
    n = start(broker, REJECT)
    reported = early(latency, size)
    assert broker.report(n, 0, reported) is False

    (row,) = TrialLog(run_dir).rows()
    assert row["number"] == n and row["status"] == "REJECTED" and row["candidate"] == REJECT
    assert row["metrics"] == reported  # the measured figures, nothing made up
    assert row["epochs"] == 0 and row["feasible"] is False and row["artifact"] is None
    assert "val_accuracy" not in row["metrics"]  # the placeholder lives only in the study

    trial = broker.study.trials[n]
    assert trial.state == TrialState.COMPLETE
    assert trial.values == [0.0, latency]  # accuracy: its worst value; latency: as measured
    assert trial.constraints == pytest.approx(constraints)
    assert max(trial.constraints.values()) > 0

    assert broker.in_flight == [] and broker.done == 1
    # ended: a second report, a late finish or failure changes nothing
    assert broker.report(n, 0, early(0.1, 10.0)) is False
    broker.finished(n, done_metrics(0.9, 0.1))
    broker.failed(n, "late")
    assert len(TrialLog(run_dir).rows()) == 1 and broker.study.trials[n].state == TrialState.COMPLETE
    assert not (run_dir / RUNGS_JSONL).exists()  # no rung was judged


@pytest.mark.parametrize("scheduler", [lambda: FullTraining(latency_first=True, directions=["max", "min"]), moasha],
                         ids=["full", "moasha"])
def test_at_the_budget_at_epoch_0_trains_on_and_finishes_complete(tmp_path: Path, open_broker: Any,
                                                                   scheduler: Any) -> None:
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, scheduler())
    n = start(broker, REJECT)
    assert broker.report(n, 0, early(LAT_BUDGET, BYTES_BUDGET)) is True  # exactly at both budgets: within
    assert TrialLog(run_dir).rows() == [] and broker.in_flight == [n]
    assert broker.study.trials[n].state == TrialState.RUNNING
    broker.finished(n, {**done_metrics(0.7, LAT_BUDGET), "model_bytes": BYTES_BUDGET})
    (row,) = TrialLog(run_dir).rows()
    assert row["status"] == "COMPLETE" and row["feasible"] is True and "epochs" not in row
    assert broker.study.trials[n].values == [0.7, LAT_BUDGET]


@pytest.mark.parametrize(("scheduler", "objectives", "reports"), [
    (lambda: moasha(latency_first=False), OBJ, True),  # rungs: trials report, but epoch 0 rejects nothing
    (lambda: FullTraining(latency_first=False), OBJ, False),
    # the only budget is on accuracy, which an untrained file cannot give
    (lambda: FullTraining(latency_first=True), Objectives(("val_accuracy", "latency_ms"), ("max", "min"),
                                                          {"val_accuracy": ("lower", 0.5)}), False),
    (lambda: None, OBJ, False),
], ids=["moasha-latency_first-off", "full-latency_first-off", "full-no-untrained-budget", "no-scheduler"])
def test_no_rejection_without_latency_first_or_a_budget_it_applies_to(
        tmp_path: Path, open_broker: Any, scheduler: Any, objectives: Objectives, reports: bool) -> None:
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, scheduler(), objectives)
    assert broker.reports is reports
    n = start(broker, REJECT)
    assert broker.report(n, 0, early(100.0, 1e9)) is True
    assert TrialLog(run_dir).rows() == [] and broker.in_flight == [n]


# ---------------------------------------------------------------------------------------------- (b) MO-ASHA


def test_moasha_stops_all_but_the_top_third_at_each_rung(tmp_path: Path, open_broker: Any) -> None:
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, moasha())
    numbers = judge_rung_one(broker)
    # a kept trial's report repeated (a retried worker) replays its decision; an epoch that is no rung asks nothing
    assert broker.report(numbers["A"], 1, at_rung(0.01, 2.99)) is True
    assert broker.report(numbers["A"], 3, at_rung(0.01, 2.99)) is True
    for name, ((acc, lat), keep) in RUNG2.items():
        assert broker.report(numbers[name], 2, at_rung(acc, lat)) is keep, name
    for name in ("A", "D"):
        broker.finished(numbers[name], done_metrics(RUNG2[name][0][0] + 0.01, RUNG1[name][1][1]))

    rows = rows_of(run_dir)
    assert sorted(rows) == sorted(numbers.values())
    stopped_at = {"B": 1, "C": 1, "E": 1, "F": 2}
    for name, epoch in stopped_at.items():
        row, trial = rows[numbers[name]], broker.study.trials[numbers[name]]
        acc, lat = RUNG2[name][0] if epoch == 2 else RUNG1[name][1]
        assert row["status"] == "STOPPED" and row["epochs"] == epoch, name
        assert row["metrics"] == at_rung(acc, lat) and row["feasible"] is False and row["artifact"] is None
        assert trial.state == TrialState.PRUNED and trial.values is None
        assert trial.constraints == pytest.approx({"latency_ms": lat - LAT_BUDGET, "model_bytes": BYTES - BYTES_BUDGET})
    for name in ("A", "D"):
        assert rows[numbers[name]]["status"] == "COMPLETE" and rows[numbers[name]]["feasible"] is True
        assert broker.study.trials[numbers[name]].state == TrialState.COMPLETE
    assert broker.in_flight == [] and broker.done == 6

    # rungs.jsonl: each (arch, epoch) once, in the order decided, with the values ranked and the trial number
    records = TrialLog(run_dir, RUNGS_JSONL).rows()
    expected = [(arch_id(RUNG1[n][0]), 1, RUNG1[n][2], list(RUNG1[n][1])) for n in ORDER]
    expected += [(arch_id(RUNG1[n][0]), 2, keep, list(values)) for n, (values, keep) in RUNG2.items()]
    assert rung_records(run_dir) == expected
    assert max(Counter((r["key"], r["epoch"]) for r in records).values()) == 1
    by_key = {arch_id(RUNG1[n][0]): numbers[n] for n in ORDER}
    assert all(r["number"] == by_key[r["key"]] for r in records)
    assert broker.scheduler is not None
    assert broker.scheduler.counts() == {1: {"judged": 6, "stopped": 3}, 2: {"judged": 3, "stopped": 1}}

    # a stopped trial has ended: further reports stop it again and record nothing
    assert broker.report(numbers["B"], 1, at_rung(0.99, 0.1)) is False
    assert broker.report(numbers["B"], 2, at_rung(0.99, 0.1)) is False
    assert len(TrialLog(run_dir, RUNGS_JSONL).rows()) == len(records) and len(rows_of(run_dir)) == 6


def test_a_rung_report_without_an_objective_is_stopped_not_kept(tmp_path: Path, open_broker: Any) -> None:
    """The first trial at a rung always goes on, unless its values cannot be ranked (no latency reported)."""
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, moasha())
    n = start(broker, CELLS[1])
    assert broker.report(n, 1, {"rung_val_accuracy": 0.9, "train_epochs_full": 6.0}) is False
    (row,) = TrialLog(run_dir).rows()
    assert row["status"] == "STOPPED" and row["epochs"] == 1
    assert broker.study.trials[n].state == TrialState.PRUNED


# ---------------------------------------------------------------------------------------------- (c) repeats


def _assert_repeats_answered(broker: Broker, run_dir: Path, stopped: dict, rejected: dict, fresh: dict) -> None:
    """Queue the stopped and the rejected candidate again, then a fresh one: only the fresh one is handed out, the
    two repeats are told as their first evaluation ended, and nothing is recorded for them."""
    before_rows, before_rungs, before_dups = len(TrialLog(run_dir).rows()), rung_records(run_dir), broker.duplicates
    first_stop = next(t for t in broker.study.trials if t.params == stopped and DUPLICATE not in t.user_attrs)
    first_reject = next(t for t in broker.study.trials if t.params == rejected and DUPLICATE not in t.user_attrs)
    for cell in (stopped, rejected, fresh):
        broker.study.enqueue_trial(cell)
    job = broker.next()
    assert job is not None and job[1] == fresh
    repeat_stop, repeat_reject = broker.study.trials[job[0] - 2], broker.study.trials[job[0] - 1]
    assert repeat_stop.params == stopped and repeat_stop.user_attrs[DUPLICATE] == arch_id(stopped)
    assert repeat_stop.state == TrialState.PRUNED and repeat_stop.values is None
    assert repeat_stop.constraints == pytest.approx(first_stop.constraints) and repeat_stop.constraints
    assert repeat_reject.params == rejected and repeat_reject.user_attrs[DUPLICATE] == arch_id(rejected)
    assert repeat_reject.state == TrialState.COMPLETE
    assert repeat_reject.values == [0.0, REJECTED_LATENCY] == first_reject.values
    assert repeat_reject.constraints == pytest.approx(first_reject.constraints)
    assert max(repeat_reject.constraints.values()) > 0
    assert broker.duplicates == before_dups + 2
    assert len(TrialLog(run_dir).rows()) == before_rows and rung_records(run_dir) == before_rungs


def _stop_one_and_reject_one(broker: Broker) -> tuple[dict, dict]:
    stopped, (acc, lat), _ = RUNG1["B"]
    keeper, (acc_a, lat_a), _ = RUNG1["A"]
    a = start(broker, keeper)
    assert broker.report(a, 1, at_rung(acc_a, lat_a)) is True
    b = start(broker, stopped)
    assert broker.report(b, 1, at_rung(acc, lat)) is False
    r = start(broker, REJECT)
    assert broker.report(r, 0, early(REJECTED_LATENCY)) is False
    broker.finished(a, done_metrics(acc_a, lat_a))
    return stopped, REJECT


def test_repeats_of_a_stopped_and_a_rejected_candidate_are_answered_without_running(tmp_path: Path,
                                                                                     open_broker: Any) -> None:
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, moasha())
    stopped, rejected = _stop_one_and_reject_one(broker)
    _assert_repeats_answered(broker, run_dir, stopped, rejected, CELLS[20])


def test_a_resumed_broker_answers_the_same_repeats_from_the_study(tmp_path: Path, open_broker: Any) -> None:
    run_dir = tmp_path / "run"
    stopped, rejected = _stop_one_and_reject_one(open_broker(run_dir, moasha()))
    resumed = open_broker(run_dir, moasha(), reconcile=True)
    assert resumed.done == 3
    _assert_repeats_answered(resumed, run_dir, stopped, rejected, CELLS[21])


# ---------------------------------------------------------------------------------------------- (d) restore


def _judge(broker: Broker, cell: dict, acc: float, lat: float) -> bool:
    n = start(broker, cell)
    assert broker.report(n, 0, early(lat)) is True
    return broker.report(n, 1, at_rung(acc, lat))


def test_a_resumed_sweep_decides_as_an_uninterrupted_one(tmp_path: Path, open_broker: Any) -> None:
    """The driver dies with A still training (kept at rung 1) and X judged (stop, in rungs.jsonl) but not yet
    recorded STOPPED. Resumed: both re-run and get their recorded decisions again, whatever they report now,
    without a second record; G and H are decided as by a driver that never died."""
    # uninterrupted: A..F, X, G, H
    whole = open_broker(tmp_path / "whole", moasha())
    judge_rung_one(whole)
    assert _judge(whole, X[0], *X[1]) is False
    reference = [_judge(whole, G[0], *G[1]), _judge(whole, H[0], *H[1])]
    assert reference == [False, True]  # by hand (module docstring)
    assert moasha().decide(arch_id(G[0]), 1, G[1]) is True  # alone at a rung G goes on: history decides

    # interrupted after rung 1 of A..F (D and F finish; A still training) and X's decision
    run_dir = tmp_path / "run"
    dead = open_broker(run_dir, moasha())
    numbers = judge_rung_one(dead)
    for name in ("D", "F"):
        dead.finished(numbers[name], done_metrics(*RUNG1[name][1]))
    x = start(dead, X[0])
    assert dead.report(x, 0, early(X[1][1])) is True
    assert dead.recorder is not None
    dead.recorder.rung(x, X[0], 1, list(X[1]), False, at_rung(*X[1]))  # killed right after the record
    assert x not in rows_of(run_dir)

    resumed = open_broker(run_dir, moasha(), reconcile=True)
    interrupted = {t.number for t in resumed.study.trials if INTERRUPTED in t.user_attrs}
    assert interrupted == {numbers["A"], x}
    assert resumed.scheduler is not None and whole.scheduler is not None
    assert resumed.scheduler.counts() == {1: {"judged": 7, "stopped": 4}, 2: {"judged": 0, "stopped": 0}}
    records_before = rung_records(run_dir)
    again = {}
    for _ in range(2):  # the interrupted ones were queued: handed out first, and report worse / better now
        job = resumed.next()
        assert job is not None
        resumed.started(job[0])
        again[arch_id(job[1])] = job[0]
    a_again, x_again = again[arch_id(RUNG1["A"][0])], again[arch_id(X[0])]
    assert resumed.report(a_again, 1, at_rung(0.01, 2.99)) is True  # recorded keep, though now it ranks last
    assert resumed.report(x_again, 1, at_rung(0.99, 0.01)) is False  # recorded stop, though now it ranks first
    assert rung_records(run_dir) == records_before  # replayed, not recorded again
    assert rows_of(run_dir)[x_again]["status"] == "STOPPED" and rows_of(run_dir)[x_again]["epochs"] == 1

    assert [_judge(resumed, G[0], *G[1]), _judge(resumed, H[0], *H[1])] == reference
    assert resumed.scheduler.counts() == whole.scheduler.counts()
    assert rung_records(run_dir) == rung_records(tmp_path / "whole")
    keys = [(k, e) for k, e, _, _ in rung_records(run_dir)]
    assert len(keys) == len(set(keys)) == 9


def test_a_driver_killed_between_the_record_and_the_tell_is_told_on_resume_as_the_broker_would(
        tmp_path: Path, open_broker: Any) -> None:
    """STOPPED and REJECTED rows written, Optuna not told yet: resume tells PRUNED and COMPLETE-infeasible, with
    the same constraint values the broker tells, and queues neither again."""
    whole = open_broker(tmp_path / "whole", moasha())
    stopped, rejected = _stop_one_and_reject_one(whole)
    told = {arch_id(t.params): t for t in whole.study.trials}

    run_dir = tmp_path / "run"
    dead = open_broker(run_dir, moasha())
    a = start(dead, RUNG1["A"][0])
    assert dead.report(a, 1, at_rung(*RUNG1["A"][1])) is True
    dead.finished(a, done_metrics(*RUNG1["A"][1]))
    assert dead.recorder is not None
    b, r = start(dead, stopped), start(dead, rejected)
    dead.recorder.ended_early(b, stopped, "stopped", at_rung(*RUNG1["B"][1]), 1, None)
    dead.recorder.ended_early(r, rejected, "rejected", early(REJECTED_LATENCY), 0, None)
    assert dead.study.trials[b].state == dead.study.trials[r].state == TrialState.RUNNING

    resumed = open_broker(run_dir, moasha(), reconcile=True)
    assert resumed.done == 3 and resumed.study.get_trials(states=(TrialState.WAITING,)) == []
    for number, cell in ((b, stopped), (r, rejected)):
        t, ref = resumed.study.trials[number], told[arch_id(cell)]
        assert INTERRUPTED not in t.user_attrs
        assert (t.state, t.values) == (ref.state, ref.values) and t.constraints == pytest.approx(ref.constraints)
    assert resumed.study.trials[b].state == TrialState.PRUNED and resumed.study.trials[r].values == [0.0, REJECTED_LATENCY]


# ---------------------------------------------------------------------------------------------- (e) accounting


def test_schedule_line_counts_epochs_stops_per_rung_and_rejections_from_the_rows(tmp_path: Path,
                                                                               open_broker: Any) -> None:
    run_dir = tmp_path / "run"
    broker = open_broker(run_dir, moasha())
    first = start(broker, CELLS[30])
    broker.finished(first, done_metrics(0.5, 1.0))
    assert schedule_line(TrialLog(run_dir).rows()) == ""  # nothing stopped or rejected: no schedule part
    assert broker.recorder is not None and "epochs" not in broker.recorder.snapshot()[4]

    numbers = judge_rung_one(broker)  # B, C, E stopped at 1
    for name, ((acc, lat), _) in RUNG2.items():
        broker.report(numbers[name], 2, at_rung(acc, lat))  # F stopped at 2
    for name in ("A", "D"):
        broker.finished(numbers[name], done_metrics(*RUNG2[name][0]))
    r = start(broker, REJECT)
    assert broker.report(r, 0, early(REJECTED_LATENCY)) is False
    failed = start(broker, CELLS[31])
    broker.failed(failed, "boom")  # epochs unknown: not counted

    rows = TrialLog(run_dir).rows()
    assert len(rows) == 9
    # trained: 3 complete * 6 + stopped 1 + 1 + 1 + 2 + rejected 0 = 23, of 8 counted trials * 6 = 48
    s = schedule_summary(rows)
    assert s["epochs"] == 23 and s["epochs_full"] == 48 and s["counted"] == 8
    assert s["stopped"] == {1: 3, 2: 1} and s["rejected"] == 1
    assert s["saved_share"] == pytest.approx(25 / 48)
    line = "epochs 23 of 48 (52% saved) | stopped 3@1 1@2 | rejected 1"
    assert schedule_line(rows) == line

    done, running, n_failed, _, best = broker.recorder.snapshot()
    assert (done, running, n_failed) == (9, 0, 1) and best.endswith(" | " + line)
    progress = broker.recorder.progress
    progress.render(force=True)
    assert line in progress.stream.getvalue().splitlines()[-1]  # type: ignore[attr-defined]
    # a resumed driver's recorder reads the same rows back: the same line
    resumed = open_broker(run_dir, moasha(), reconcile=True)
    assert resumed.recorder is not None and resumed.recorder.snapshot()[4].endswith(" | " + line)
