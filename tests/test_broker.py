"""The one trial lifecycle (search/broker.py): suggest -> de-duplicate -> evaluate -> record -> tell -> track.

A real Optuna study (the sweep's journal in run_dir), the real NAS-Bench-201 space on 2 ops (64 cells)
and the real tabular evaluator over a small CSV; both runners are checked to go through the broker.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import NB201_OPS, nb201_cells

from hwnas.evaluators.base import Evaluation, Evaluator
from hwnas.evaluators.tabular import TabularEvaluator
from hwnas.search.broker import Broker
from hwnas.search.objectives import Objectives
from hwnas.search.progress import Progress
from hwnas.search.recorder import Recorder
from hwnas.search.runners.base import Runner
from hwnas.search.runners.local_runner import LocalRunner
from hwnas.search.runners.sweep import Sweep
from hwnas.search.study_record import DUPLICATE
from hwnas.search.trial_log import TrialLog
from hwnas.spaces.base import SearchSpace
from hwnas.spaces.candidate import arch_id
from hwnas.spaces.nb201 import NB201Space, to_arch_string

optuna.logging.set_verbosity(optuna.logging.WARNING)
OPS = list(NB201_OPS)
CELLS = nb201_cells()
OBJECTIVES = Objectives(("acc", "latency_ms"), ("max", "min"), {"latency_ms": ("upper", 3.0)})


def space() -> NB201Space:
    return NB201Space(ops=OPS, C=4, N=1, prune_ratios=[0.0], quant=["fp32"])


def write_table(path: Path, missing: list[dict[str, Any]] = ()) -> Path:  # type: ignore[assignment]
    """Every cell with random numbers, except the `missing` ones (their look-up raises)."""
    rng = np.random.default_rng(0)
    left_out = {to_arch_string(c) for c in missing}
    arches = [to_arch_string(c) for c in CELLS]
    frame = pd.DataFrame({"arch": arches, "acc": rng.uniform(10, 95, len(arches)), "latency_ms": rng.uniform(0.2, 5.0, len(arches))})
    frame[~frame["arch"].isin(left_out)].to_csv(path, index=False)
    return path


class CountingEvaluator(TabularEvaluator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Evaluation:
        self.calls.append(arch_id(candidate))
        return super().evaluate(candidate, trial_dir, deadline)


class CountingBroker(Broker):
    """Counts what a runner reports: a runner that bypassed the broker would leave these at zero."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = {"next": 0, "started": 0, "finished": 0, "failed": 0}

    def next(self) -> tuple[int, dict[str, Any]] | None:
        self.calls["next"] += 1
        return super().next()

    def started(self, number: int) -> None:
        self.calls["started"] += 1
        super().started(number)

    def finished(self, number: int, *args: Any, **kwargs: Any) -> None:
        self.calls["finished"] += 1
        super().finished(number, *args, **kwargs)

    def failed(self, number: int, *args: Any, **kwargs: Any) -> None:
        self.calls["failed"] += 1
        super().failed(number, *args, **kwargs)


def make_sweep(tmp_path: Path, n_trials: int, missing: list[dict[str, Any]] = (), seed: int = 0) -> Sweep:  # type: ignore[assignment]
    sp = space()
    evaluator = CountingEvaluator(str(write_table(tmp_path / "table.csv", missing)), "arch", sp, OBJECTIVES)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return Sweep(sp, optuna.samplers.RandomSampler(seed=seed), evaluator, OBJECTIVES, n_trials, run_dir, "test")


def make_broker(sweep: Sweep, cls: type[Broker] = Broker, work: Any = None, **kwargs: Any) -> Broker:
    recorder = Recorder(sweep.run_dir, OBJECTIVES, None, Progress(sweep.n_trials, stream=io.StringIO()), {}, work)
    return cls(sweep.create_study(), sweep.space, sweep.objectives, sweep.n_trials, recorder, **kwargs)


def rows(sweep: Sweep) -> list[dict[str, Any]]:
    return TrialLog(sweep.run_dir).rows()


def test_interfaces_are_checkable_at_run_time(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 1)
    assert isinstance(sweep.space, SearchSpace) and isinstance(sweep.evaluator, Evaluator)
    assert isinstance(LocalRunner(max_concurrent=1, trial_timeout_s=None), Runner)
    assert not isinstance(object(), Runner) and not isinstance(object(), Evaluator) and not isinstance(object(), SearchSpace)


def test_n_trials_distinct_evaluations_exactly_and_repeats_answered_from_the_record(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 40)  # 40 of 64 cells at random: the sampler repeats itself
    broker = make_broker(sweep)
    LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, broker)
    calls = sweep.evaluator.calls  # type: ignore[attr-defined]
    assert len(calls) == 40 == len(set(calls)) == len(rows(sweep)) == broker.done
    assert broker.duplicates > 0 and broker.recorder is not None and broker.recorder.duplicates == broker.duplicates
    by_arch = {r["arch_id"]: r for r in rows(sweep)}
    repeats = [t for t in broker.study.trials if DUPLICATE in t.user_attrs]
    assert len(repeats) == broker.duplicates
    for t in repeats:  # told the recorded values and constraint values, without evaluating
        row = by_arch[t.user_attrs[DUPLICATE]]
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.values == [row["metrics"]["acc"], row["metrics"]["latency_ms"]]
        assert t.constraints == {"latency_ms": pytest.approx(row["metrics"]["latency_ms"] - 3.0)}
    assert broker.next() is None and broker.left() == 0


def test_a_repeat_is_told_the_recorded_outcome_and_never_evaluated(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 2)
    broker = make_broker(sweep)
    for cell in (CELLS[0], CELLS[0], CELLS[1]):
        broker.study.enqueue_trial(cell)
    number, candidate = broker.next()  # type: ignore[misc]
    assert candidate == CELLS[0]
    broker.started(number)
    broker.finished(number, {"acc": 50.0, "latency_ms": 1.0})
    second, candidate = broker.next()  # type: ignore[misc]
    assert candidate == CELLS[1] and second == number + 2  # the repeat in between was answered
    repeat = broker.study.trials[number + 1]
    assert repeat.state == optuna.trial.TrialState.COMPLETE and repeat.values == [50.0, 1.0]
    assert repeat.user_attrs[DUPLICATE] == arch_id(CELLS[0]) and broker.duplicates == 1
    assert len(rows(sweep)) == 1


def test_a_candidate_in_flight_is_never_handed_out_twice(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 3)
    broker = make_broker(sweep)
    for cell in (CELLS[0], CELLS[0], CELLS[1]):
        broker.study.enqueue_trial(cell)
    first, a = broker.next()  # type: ignore[misc]
    second, b = broker.next()  # type: ignore[misc]
    assert a == CELLS[0] and b == CELLS[1] and broker.in_flight == [first, second]
    dropped = broker.study.trials[first + 1]  # the same candidate, proposed while in flight
    assert dropped.state == optuna.trial.TrialState.FAIL and DUPLICATE in dropped.user_attrs
    assert broker.left() == 1


def test_a_failed_trial_is_recorded_failed_and_told_fail(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 3, missing=[CELLS[5]])
    broker = make_broker(sweep)
    for cell in (CELLS[4], CELLS[5], CELLS[6]):
        broker.study.enqueue_trial(cell)
    LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, broker)
    failed = [r for r in rows(sweep) if r["status"] == "FAILED"]
    assert len(rows(sweep)) == 3 and len(failed) == 1
    assert failed[0]["candidate"] == CELLS[5] and "is not in table" in failed[0]["error"]
    assert broker.study.trials[failed[0]["number"]].state == optuna.trial.TrialState.FAIL
    # A failed candidate has no outcome to answer a repeat with: proposed again, it is evaluated again.
    assert arch_id(CELLS[5]) not in broker._outcomes


def test_trials_jsonl_is_written_before_optuna_is_told(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 6, missing=[CELLS[1]])
    broker = make_broker(sweep)
    for cell in CELLS[:3]:
        broker.study.enqueue_trial(cell)
    tell = broker.study.tell
    seen: list[int] = []

    def checked_tell(trial: Any, *args: Any, **kwargs: Any) -> Any:
        number = trial if isinstance(trial, int) else trial.number
        if DUPLICATE not in broker.study.trials[number].user_attrs:
            assert number in {r["number"] for r in rows(sweep)}, "Optuna told before trials.jsonl"
            seen.append(number)
        return tell(trial, *args, **kwargs)

    broker.study.tell = checked_tell  # type: ignore[method-assign]
    LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, broker)
    assert sorted(seen) == sorted(r["number"] for r in rows(sweep)) and len(seen) == 6


def test_an_exhausted_space_evaluates_repeats_after_the_streak(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 3)
    broker = make_broker(sweep, max_duplicate_streak=4)
    for cell in [CELLS[0]] * 8:
        broker.study.enqueue_trial(cell)
    LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, broker)
    calls = sweep.evaluator.calls  # type: ignore[attr-defined]
    # evaluated; 4 repeats answered; the 5th evaluated anyway; the streak restarts: the last 2 answered
    assert calls[:2] == [arch_id(CELLS[0])] * 2 and calls[2] != calls[0] and len(calls) == 3
    assert broker.duplicates == 6


def test_a_resumed_broker_counts_the_recorded_trials_and_hands_out_queued_ones_first(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 3)
    LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, make_broker(sweep))
    done = rows(sweep)
    sweep.n_trials = 5
    resumed = make_broker(sweep)
    assert resumed.done == 3 and resumed.left() == 2
    resumed.study.enqueue_trial(done[0]["candidate"])  # recorded already: answered, not evaluated
    resumed.study.enqueue_trial(CELLS[63])  # as a resume queues an interrupted trial
    number, candidate = resumed.next()  # type: ignore[misc]
    assert candidate == CELLS[63] and resumed.duplicates == 1


def test_end_of_sweep_work_starts_once_no_trial_is_left_to_start(tmp_path: Path) -> None:
    fired = threading.Event()
    calls: list[int] = []

    def work() -> None:
        calls.append(1)
        fired.set()

    sweep = make_sweep(tmp_path, 4)
    broker = make_broker(sweep, work=work)
    a, b = broker.next(), broker.next()
    assert a is not None and b is not None
    broker.finished(a[0], {"acc": 1.0, "latency_ms": 1.0})  # 1 done + 1 in flight: 2 still to start
    c = broker.next()
    broker.finished(b[0], {"acc": 1.0, "latency_ms": 1.0})  # 2 done + 1 in flight: 1 still to start
    assert not fired.is_set()
    d = broker.next()
    assert c is not None and d is not None and broker.next() is None
    broker.failed(c[0], "boom")  # 3 done + 1 in flight: nothing left to start, a slot is free
    assert fired.wait(5)
    broker.finished(d[0], {"acc": 1.0, "latency_ms": 1.0})
    assert broker.recorder is not None
    broker.recorder.close()
    assert calls == [1]


def test_missing_objective_metric_fails_the_trial(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, 1)
    broker = make_broker(sweep)
    number, _ = broker.next()  # type: ignore[misc]
    broker.finished(number, {"acc": 1.0})
    assert rows(sweep)[0]["status"] == "FAILED" and "latency_ms" in rows(sweep)[0]["error"]


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_both_runners_go_through_the_broker(tmp_path: Path, runner: str) -> None:
    """A look-up that raises is one FAILED row in trials.jsonl, reported through the broker."""
    sweep = make_sweep(tmp_path, 4, missing=[CELLS[2]])
    broker = make_broker(sweep, CountingBroker)
    for cell in CELLS[:4]:
        broker.study.enqueue_trial(cell)
    if runner == "local":
        LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, broker)
    else:
        import ray

        from hwnas.search.runners.ray_runner import RayRunner

        # Ray pickles the evaluator for its workers: the plain tabular one (its class is importable there).
        sweep.evaluator = TabularEvaluator(str(tmp_path / "table.csv"), "arch", sweep.space, OBJECTIVES)  # type: ignore[arg-type]
        ray_runner = RayRunner(max_concurrent=2, resources={"cpu": 1}, address=None, storage=None, max_failures=0, trial_timeout_s=None)
        assert isinstance(ray_runner, Runner)
        try:
            ray_runner.run(sweep, broker)
        finally:
            ray.shutdown()
    recorded = rows(sweep)
    assert sorted(json.dumps(r["candidate"], sort_keys=True) for r in recorded) == sorted(
        json.dumps(c, sort_keys=True) for c in CELLS[:4]
    )
    failed = [r for r in recorded if r["status"] == "FAILED"]
    assert len(failed) == 1 and failed[0]["candidate"] == CELLS[2] and "is not in table" in failed[0]["error"]
    assert broker.calls == {"next": 5, "started": 4, "finished": 3, "failed": 1}  # type: ignore[attr-defined]
    assert {t.state for t in broker.study.trials} == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    assert broker.in_flight == []


def test_a_driver_killed_mid_sweep_resumes_to_exactly_n_trials(tmp_path: Path) -> None:
    """The driver dies with one trial recorded but not told, and one running: resume finishes both ways."""
    from hwnas.search.study_record import INTERRUPTED, evaluated_trials, reconcile_study

    sweep = make_sweep(tmp_path, 5)
    dead = make_broker(sweep)
    told, untold, running = dead.next(), dead.next(), dead.next()
    assert told and untold and running
    dead.finished(told[0], {"acc": 50.0, "latency_ms": 1.0})
    assert dead.recorder is not None
    dead.recorder.finished(untold[0], untold[1], {"acc": 60.0, "latency_ms": 2.0}, None, None)  # killed before tell
    dead.recorder.close()

    study = sweep.create_study()  # a new driver: resume=true
    retried = reconcile_study(study, rows(sweep), OBJECTIVES)
    assert retried == [running[1]]
    resumed = Broker(study, sweep.space, OBJECTIVES, 5, make_broker(sweep).recorder)
    assert resumed.left() == 3
    job = resumed.next()
    assert job == (running[0] + 1, running[1])  # the interrupted candidate, queued, comes first
    resumed.finished(job[0], {"acc": 70.0, "latency_ms": 1.5})
    LocalRunner(max_concurrent=1, trial_timeout_s=None).run(sweep, resumed)
    assert len(rows(sweep)) == 5 and len({r["number"] for r in rows(sweep)}) == 5
    assert sorted(t.number for t in evaluated_trials(study)) == sorted(r["number"] for r in rows(sweep))
    assert study.trials[untold[0]].values == [60.0, 2.0] and INTERRUPTED in study.trials[running[0]].user_attrs
