"""In-process Optuna ask/tell loop: no Ray, no processes. Thousands of table look-ups take seconds."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from hwnas.search.dedup import EvaluationRecord, Outcome, remember_study, tell
from hwnas.search.recorder import Recorder
from hwnas.search.runners.limits import check_timeout, deadline_after, error_text
from hwnas.search.runners.sweep import Sweep
from hwnas.search.study_record import DUPLICATE
from hwnas.spaces.candidate import arch_id

# Consecutive duplicate proposals after which the space counts as exhausted (then duplicates run).
MAX_DUPLICATE_STREAK = 200

Evaluate = Callable[[int, dict[str, Any]], Outcome]


def optimize(
    study: optuna.Study,
    suggest: Callable[[optuna.Trial], dict[str, Any]],
    evaluate: Evaluate,
    n_evaluations: int,
    *,
    on_start: Callable[[int, dict[str, Any]], None] | None = None,
    on_fail: Callable[[int, dict[str, Any], BaseException], None] | None = None,
    on_duplicate: Callable[[], None] | None = None,
) -> int:
    """Run ask -> suggest -> evaluate -> tell until `n_evaluations` distinct candidates were evaluated.

    `evaluate(number, candidate)` returns the outcome (objective values, constraint values), or
    raises (the trial is told FAIL, `on_fail` is called, and the loop goes on). Returns the number
    of evaluations made.
    """
    record = EvaluationRecord(MAX_DUPLICATE_STREAK)
    remember_study(record, study)  # a resumed study's history counts too
    done = 0
    while done < n_evaluations:
        trial = study.ask()
        candidate = suggest(trial)
        aid = arch_id(candidate)
        known = record.known(aid)
        if known is not None and not record.exhausted():
            record.hit()
            trial.set_user_attr(DUPLICATE, aid)
            tell(study, trial, known)
            if on_duplicate is not None:
                on_duplicate()
            continue
        record.start(aid)
        if on_start is not None:
            on_start(trial.number, candidate)
        done += 1
        try:
            outcome = evaluate(trial.number, candidate)
        except Exception as exc:  # a failed candidate is a result, not the end of the sweep
            record.complete(aid, None)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if on_fail is not None:
                on_fail(trial.number, candidate, exc)
            continue
        record.complete(aid, outcome)
        tell(study, trial, outcome)
    return done


class LocalRunner:
    def __init__(self, *, max_concurrent: int, trial_timeout_s: float | None) -> None:
        if max_concurrent != 1:
            raise ValueError(f"runner.max_concurrent: {max_concurrent} with runner=local; allowed: 1 (use runner=ray for parallel trials)")
        self.max_concurrent = max_concurrent
        self.trial_timeout_s = check_timeout(trial_timeout_s)

    def run(self, sweep: Sweep, recorder: Recorder) -> optuna.Study:
        study = sweep.create_study()
        node = socket.gethostname()

        def evaluate(number: int, candidate: dict[str, Any]) -> Outcome:
            result = sweep.evaluator.evaluate(candidate, sweep.trial_dir(number), deadline=deadline_after(self.trial_timeout_s))
            outcome = Outcome.of(sweep.objectives.values(result.metrics), sweep.objectives.constraints(result.metrics))
            recorder.finished(number, candidate, result.metrics, result.artifact, node)
            return outcome

        def on_fail(number: int, candidate: Mapping[str, Any], exc: BaseException) -> None:
            recorder.failed(number, dict(candidate), error_text(exc), node)

        optimize(
            study,
            sweep.space.suggest,
            evaluate,
            sweep.n_trials - recorder.done,
            on_start=recorder.started,
            on_fail=on_fail,
            on_duplicate=recorder.duplicate,
        )
        return study
