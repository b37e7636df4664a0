"""One trial lifecycle, whatever places the trials: suggest -> de-duplicate -> (evaluate, with the scheduler's
rung decisions) -> record -> tell -> track.

The broker owns the sweep's Optuna study and hands out work; a runner only places it (in-process,
or on Ray workers) and reports back how it ended:

    while (job := broker.next()) is not None:     # None: nothing is left to start
        number, candidate = job
        broker.started(number)
        ... evaluate ...
        broker.finished(number, metrics, artifact, node)   # or broker.failed(number, error, node)

With a scheduler (search/schedulers/) the evaluator reports as it goes (`broker.report(number, epoch, metrics)`):
epoch 0 is its untrained file (latency-first: over a pre-training budget, the trial is REJECTED without
training), each rung epoch its rung accuracy (MO-ASHA: STOPPED unless it ranks in the top fraction). Either ends
the trial there: recorded, then told (search/trial_outcome.py says how, and why).

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hwnas.search.objectives import Objectives
from hwnas.search.runners.limits import error_text
from hwnas.search.schedulers.latency_first import over_budget, pre_training_bounds
from hwnas.search.study_record import DUPLICATE, WARM_START
from hwnas.search.trial_outcome import Outcome, rejected_outcome, rung_view, stopped_outcome, tell
from hwnas.spaces.base import SearchSpace
from hwnas.spaces.candidate import arch_id

if TYPE_CHECKING:
    from hwnas.search.recorder import Recorder
    from hwnas.search.schedulers.base import Scheduler

__all__ = ["Broker", "Outcome", "MAX_DUPLICATE_STREAK"]

# Consecutive duplicate proposals after which the space counts as exhausted (then duplicates run).
MAX_DUPLICATE_STREAK = 200


@dataclass
class _Flight:
    trial: optuna.Trial
    candidate: dict[str, Any]
    arch: str
    early: dict[str, float] = field(default_factory=dict)  # what its untrained file measured (epoch 0)


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
        scheduler: Scheduler | None = None,
    ) -> None:
        """`study`: the sweep's study, with its whole history when resumed (`Sweep.create_study`).
        `recorder` None: nothing is written (benchmarks of the samplers); the count starts at 0.
        `scheduler`: rung decisions and latency-first (search/schedulers/); None: every trial trains in full.
        A resumed sweep's scheduler is restored from the recorded decisions (rungs.jsonl)."""
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
            if t.state == TrialState.COMPLETE else Outcome((), t.constraints or None, pruned=True)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if WARM_START not in t.user_attrs
        }
        self.scheduler = scheduler
        # Latency-first applies to the budgets an untrained file can be held to (latency, size), if any.
        self._reject_over = pre_training_bounds(objectives) if scheduler is not None and scheduler.latency_first else []
        self._judged: set[tuple[str, int]] = set()  # (arch, rung epoch) decided and recorded
        if scheduler is not None and recorder is not None:
            records = recorder.rung_records()
            scheduler.restore(records)
            self._judged = {(str(r["key"]), int(r["epoch"])) for r in records}

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

    @property
    def reports(self) -> bool:
        """Whether trials report to this broker as they go (a scheduler with rungs, or latency-first with a budget
        it applies to); otherwise they are evaluated without a reporter, as before schedulers."""
        return self.scheduler is not None and (bool(self.scheduler.rungs) or bool(self._reject_over))

    @property
    def rungs(self) -> tuple[int, ...]:
        return tuple(self.scheduler.rungs) if self.scheduler is not None else ()

    def report(self, number: int, epoch: int, metrics: Mapping[str, float], node: str | None = None) -> bool:
        """A running trial's report: epoch 0, its untrained file's figures; a rung epoch, its rung accuracy and
        those figures. True: train on. False: the trial has ended here, recorded and told (REJECTED before
        training, or STOPPED at the rung); also False for a trial that already ended."""
        flight = self._in_flight.get(number)
        if flight is None:
            return False
        metrics = {k: float(v) for k, v in metrics.items()}
        if epoch == 0:
            flight.early = metrics
            missed = over_budget(self.objectives, metrics, self._reject_over) if self._reject_over else []
            if missed:
                why = "rejected before training, its untrained file over budget: " + ", ".join(
                    f"{n} {metrics[n]:.6g} {'>' if self.objectives.bounds[n][0] == 'upper' else '<'} "
                    f"{self.objectives.bounds[n][1]:g}" for n in missed)
                self._end_early(number, rejected_outcome(self.objectives, metrics), "rejected", metrics, 0, node, why)
                return False
            return True
        if self.scheduler is None or epoch not in self.scheduler.rungs:
            return True
        values = [rung_view(metrics).get(name, float("nan")) for name in self.objectives.names]
        keep = self.scheduler.decide(flight.arch, epoch, values)
        # A candidate re-run after a driver crash gets its recorded decision again: recorded once.
        if self.recorder is not None and (flight.arch, epoch) not in self._judged:
            self.recorder.rung(number, flight.candidate, epoch, values, keep, metrics)
        self._judged.add((flight.arch, epoch))
        if not keep:
            why = f"stopped at epoch {epoch}: outside the share the scheduler keeps of the trials judged at that rung"
            self._end_early(number, stopped_outcome(self.objectives, metrics), "stopped", metrics, epoch, node, why)
        return keep

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
        tell(self.study, flight.trial, outcome)
        self._when_last_started()

    def failed(self, number: int, error: str, node: str | None = None) -> None:
        """The trial raised, timed out or lost its worker: recorded FAILED, then told FAIL."""
        flight = self._in_flight.get(number)
        if flight is None:
            return
        if self.recorder is not None:
            self.recorder.failed(number, flight.candidate, error, node)
        self._end(number, None)
        tell(self.study, flight.trial, None)
        self._when_last_started()

    # --- internals ---
    def _answer_repeat(self, trial: optuna.Trial, arch: str, known: Outcome | None) -> None:
        self._streak += 1
        self.duplicates += 1
        if self.recorder is not None:
            self.recorder.duplicate()
        trial.set_user_attr(DUPLICATE, arch)
        # Known: told as it was (a stopped one PRUNED again). In flight: dropped, its result is on the way.
        tell(self.study, trial, known)

    def _end_early(self, number: int, outcome: Outcome, how: str, metrics: dict[str, float], epoch: int,
                   node: str | None, why: str) -> None:
        """The scheduler ended the trial (rejected before training, or stopped at a rung): recorded, then told."""
        flight = self._in_flight[number]
        if self.recorder is not None:
            self.recorder.ended_early(number, flight.candidate, how, metrics, epoch, node, why)
        self._end(number, outcome)
        tell(self.study, flight.trial, outcome)
        self._when_last_started()

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
