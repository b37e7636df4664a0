"""Never spend an evaluation twice on the same candidate: a study-wide record keyed by arch_id.

A sampler may propose a candidate that was already evaluated (TPE does, late in a sweep). The runner
then answers it from this record - the sampler is told the recorded values (and constraint values),
so it still learns - and asks again, without training anything. Candidates still being evaluated
are held too, so two parallel trials never evaluate the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna

from hwnas.search.constraints import set_constraints
from hwnas.spaces.candidate import arch_id


@dataclass(frozen=True)
class Outcome:
    """What Optuna is told of an evaluated candidate: objective values and, with budgets, constraint values."""

    values: tuple[float, ...]
    constraints: Mapping[str, float] | None = None

    @classmethod
    def of(cls, values: Sequence[float], constraints: Mapping[str, float] | None = None) -> Outcome:
        return cls(tuple(float(v) for v in values), None if not constraints else dict(constraints))


class EvaluationRecord:
    def __init__(self, max_streak: int) -> None:
        # After this many duplicates in a row the space is taken as exhausted: evaluate anyway.
        self.max_streak = max_streak
        self.outcomes: dict[str, Outcome] = {}
        self.pending: set[str] = set()
        self.streak = 0

    def known(self, arch: str) -> Outcome | None:
        return self.outcomes.get(arch)

    def is_pending(self, arch: str) -> bool:
        return arch in self.pending

    def exhausted(self) -> bool:
        return self.streak >= self.max_streak

    def hit(self) -> None:
        self.streak += 1

    def start(self, arch: str) -> None:
        self.streak = 0
        self.pending.add(arch)

    def complete(self, arch: str, outcome: Outcome | None) -> None:
        """`outcome` None: the evaluation failed (nothing to answer a repeat with)."""
        self.pending.discard(arch)
        if outcome is not None:
            self.outcomes[arch] = outcome


def remember_study(record: EvaluationRecord, study: optuna.Study) -> None:
    """Load a (resumed) study's completed trials into the record: their outcomes answer repeats too."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        record.complete(arch_id(t.params), Outcome.of(t.values, t.constraints))


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    """Tell a trial its outcome: constraint values first, where the samplers look for them."""
    set_constraints(trial, study, outcome.constraints)
    study.tell(trial, list(outcome.values))
