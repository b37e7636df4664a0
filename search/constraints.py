"""Budgets as Optuna constraints, so that samplers steer toward feasible candidates instead of only skipping them.

A budget (`objective.latency_budget_ms`, `objective.budgets`) is one constraint per bounded metric,
`c <= 0` when met (`Objectives.constraints`). The runners store a trial's values with Optuna 5's
`Trial.set_constraint` before telling it its objective values; Optuna's TPE, NSGA-II and GP samplers
read `trial.constraints` (infeasible trials rank below feasible ones, by how far they miss), and so
do hwnas' evolution and RL samplers (`violation`). Trials over budget stay in the study: they are
results, and their objective values still teach the samplers' models.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial

_KEY = "constraints:"  # Optuna's system-attribute prefix of a trial's named constraint values


def set_constraints(trial: optuna.Trial | FrozenTrial, study: optuna.Study, constraints: Mapping[str, float] | None) -> None:
    """Store constraint values on a trial before it is told (None: the sweep has no budgets).

    A live `Trial` stores them itself; a `FrozenTrial` (a trial a dead driver left RUNNING, finished
    on resume) is written through the study's storage, as `Trial.set_constraint` would: Optuna has
    no public way to do that, pinned in tests/test_private_apis.py.
    """
    for name, value in (constraints or {}).items():
        if isinstance(trial, optuna.Trial):
            trial.set_constraint(name, float(value))
        else:
            study._storage.set_trial_system_attr(trial._trial_id, _KEY + name, float(value))


def violation(trial: FrozenTrial) -> float:
    """How far a trial misses its budgets (0 when it meets them all, or has none)."""
    return float(sum(v for v in trial.constraints.values() if v > 0))
