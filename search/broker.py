"""One trial lifecycle, whatever places the trials: suggest -> de-duplicate -> (evaluate) -> record -> tell -> track.

The broker owns the sweep's Optuna study and hands out work; a runner only places it (in-process,
or on Ray workers) and reports back how it ended:

    while (job := broker.next()) is not None:     # None: nothing is left to start
        number, candidate = job
        broker.started(number)
        ... evaluate ...
        broker.finished(number, metrics, artifact, node)   # or broker.failed(number, error, node)

- `n_trials` is read here only: `next()` hands out n_trials - recorded - in flight evaluations.
- A candidate that was already evaluated is never evaluated again: the sampler is told the recorded
  values (and constraint values), so it still learns, and asked again. A candidate still in flight
  is not handed out a second time either. After MAX_DUPLICATE_STREAK repeats in a row the space
  counts as exhausted and repeats are evaluated.
- When a trial ends it is recorded in trials.jsonl (through the Recorder, which then tracks it in
  MLflow) before Optuna is told: a driver killed in between is reconciled on resume from that file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hwnas.search.constraints import set_constraints
from hwnas.search.objectives import Objectives
from hwnas.search.runners.limits import error_text
from hwnas.search.study_record import DUPLICATE, WARM_START
from hwnas.spaces.base import SearchSpace
from hwnas.spaces.candidate import arch_id

if TYPE_CHECKING:
    from hwnas.search.recorder import Recorder

# Consecutive duplicate proposals after which the space counts as exhausted (then duplicates run).
MAX_DUPLICATE_STREAK = 200


@dataclass(frozen=True)
class Outcome:
    """What Optuna is told of an evaluated candidate: objective values and, with budgets, constraint values."""

    values: tuple[float, ...]
    constraints: Mapping[str, float] | None = None

    @classmethod
    def of(cls, values: Sequence[float], constraints: Mapping[str, float] | None = None) -> Outcome:
        return cls(tuple(float(v) for v in values), None if not constraints else dict(constraints))


@dataclass(frozen=True)
class _Flight:
    trial: optuna.Trial
    candidate: dict[str, Any]
    arch: str


class Broker:
    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        objectives: Objectives,
        n_trials: int,
        recorder: Recorder | None = None,
        *,
        max_duplicate_streak: int = MAX_DUPLICATE_STREAK,
    ) -> None:
        """`study`: the sweep's study, with its whole history when resumed (`Sweep.create_study`).
        `recorder` None: nothing is written (benchmarks of the samplers); the count starts at 0."""
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"n_trials: {n_trials!r} is not allowed; allowed: an integer >= 1")
        self.study = study
        self.space = space
        self.objectives = objectives
        self.n_trials = n_trials
        self.recorder = recorder
        self.max_duplicate_streak = max_duplicate_streak
        # Evaluations recorded so far: a resumed sweep starts from what trials.jsonl holds.
        self.done = recorder.done if recorder is not None else 0
        self.duplicates = 0
        self._streak = 0
        self._in_flight: dict[int, _Flight] = {}
        self._arches_in_flight: Counter[str] = Counter()
        # A (resumed) study's completed trials answer repeats too; an earlier sweep's (warm_start) do not:
        # their latency was measured elsewhere, so a repeat of one is evaluated here.
        self._outcomes: dict[str, Outcome] = {
            arch_id(t.params): Outcome.of(t.values, t.constraints)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if WARM_START not in t.user_attrs
        }

    # --- what a runner calls ---
    def left(self) -> int:
        """Evaluations still to start."""
        return self.n_trials - self.done - len(self._in_flight)

    @property
    def in_flight(self) -> list[int]:
        """Trial numbers handed out by `next()` that have not ended."""
        return list(self._in_flight)

    def next(self) -> tuple[int, dict[str, Any]] | None:
        """The next candidate to evaluate and its trial number; None when nothing is left to start.

        Repeats the sampler proposes are answered here (told, never handed out). Trials queued by a
        resume (WAITING) come first: `study.ask()` hands them out.
        """
        while self.left() > 0:
            trial = self.study.ask()
            candidate = self.space.suggest(trial)
            arch = arch_id(candidate)
            known = self._outcomes.get(arch)
            busy = self._arches_in_flight[arch] > 0
            if (known is None and not busy) or self._streak >= self.max_duplicate_streak:
                self._streak = 0
                self._in_flight[trial.number] = _Flight(trial, dict(candidate), arch)
                self._arches_in_flight[arch] += 1
                return trial.number, candidate
            self._answer_repeat(trial, arch, known)
        return None

    def started(self, number: int) -> None:
        """The trial is running now (MLflow: a RUNNING child run). Repeats are ignored (a retried trial)."""
        flight = self._in_flight.get(number)
        if flight is not None and self.recorder is not None:
            self.recorder.started(number, flight.candidate)
            for key, value in self.recorder.user_attrs(number, flight.candidate).items():
                flight.trial.set_user_attr(key, value)  # optuna-dashboard: the trial's run, device, data

    def finished(self, number: int, metrics: Mapping[str, float], artifact: str | None = None, node: str | None = None) -> None:
        """The evaluator's numbers: recorded (trials.jsonl, then MLflow), then told to Optuna."""
        flight = self._in_flight.get(number)
        if flight is None:
            return  # ended already: a trial is recorded and told once
        missing = [name for name in self.objectives.names if name not in metrics]
        if missing:
            self.failed(number, f"the evaluator reported no {', '.join(missing)}", node)
            return
        outcome = Outcome.of(self.objectives.values(metrics), self.objectives.constraints(metrics))
        if self.recorder is not None:
            try:
                self.recorder.finished(number, flight.candidate, metrics, artifact, node)
            except Exception as exc:  # e.g. the artifact cannot be read: the trial failed, the sweep goes on
                self.failed(number, error_text(exc), node)
                return
        self._end(number, outcome)
        self._tell(flight.trial, outcome)
        self._when_last_started()

    def failed(self, number: int, error: str, node: str | None = None) -> None:
        """The trial raised, timed out or lost its worker: recorded FAILED, then told FAIL."""
        flight = self._in_flight.get(number)
        if flight is None:
            return
        if self.recorder is not None:
            self.recorder.failed(number, flight.candidate, error, node)
        self._end(number, None)
        self.study.tell(flight.trial, state=TrialState.FAIL)
        self._when_last_started()

    # --- internals ---
    def _answer_repeat(self, trial: optuna.Trial, arch: str, known: Outcome | None) -> None:
        self._streak += 1
        self.duplicates += 1
        if self.recorder is not None:
            self.recorder.duplicate()
        trial.set_user_attr(DUPLICATE, arch)
        if known is not None:
            self._tell(trial, known)
        else:  # the same candidate is in flight: drop this proposal, its result is on the way
            self.study.tell(trial, state=TrialState.FAIL)

    def _tell(self, trial: optuna.Trial, outcome: Outcome) -> None:
        # Constraint values first: the samplers read them when the trial completes.
        set_constraints(trial, self.study, outcome.constraints)
        self.study.tell(trial, list(outcome.values))

    def _end(self, number: int, outcome: Outcome | None) -> None:
        """`outcome` None: the evaluation failed (nothing to answer a repeat with)."""
        flight = self._in_flight.pop(number)
        self._arches_in_flight[flight.arch] -= 1
        if self._arches_in_flight[flight.arch] <= 0:
            del self._arches_in_flight[flight.arch]
        if outcome is not None:
            self._outcomes[flight.arch] = outcome
        self.done += 1

    def _when_last_started(self) -> None:
        # A trial ended and none is left to start: a slot stays idle from now on.
        if self.left() <= 0 and self.recorder is not None:
            self.recorder.no_trial_left_to_start()
