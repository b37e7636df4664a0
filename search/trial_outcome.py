"""What Optuna is told of a recorded trial, by how it ended: one mapping for the broker and for a resume.

- COMPLETE: its objective values and constraint values.
- REJECTED (latency-first: its untrained file was over a budget, it never trained): COMPLETE in Optuna with its
  measured latency and constraint values, so constraint-aware samplers learn where the budget lies. Accuracy is
  unknown: Optuna needs a number, so an objective the untrained file cannot give is told its worst value
  (0 for an accuracy). TPE and NSGA-II rank an infeasible trial by how far it misses the budget before its values,
  and hwnas' evolution and RL samplers do the same (search/constraints.py `violation`): the placeholder steers
  none of them. GP's objective model does see it, only where its feasibility model already says no.
  trials.csv leaves the accuracy empty: the placeholder exists only in the study.
- STOPPED (MO-ASHA stopped it at a rung): PRUNED in Optuna, with its constraint values. Its rung accuracy is
  not a full-training figure, and telling it as one would put a low-fidelity point among full-fidelity ones
  (Optuna's multi-objective studies have no intermediate values). PRUNED says "dominated early" without a
  number: TPE puts pruned trials with the worse group, NSGA-II and GP leave them out, evolution and RL learn
  only from COMPLETE trials. A stopped trial is never on the front and never exported.
- FAILED: FAIL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from hwnas.search.constraints import set_constraints
from hwnas.search.objectives import Objectives
from hwnas.search.trial_log import COMPLETE, REJECTED, STOPPED

RUNG_PREFIX = "rung_"  # a metric measured at a rung (rung_val_accuracy): the rung's stand-in for the full figure


@dataclass(frozen=True)
class Outcome:
    """What Optuna is told of an evaluated candidate: objective values and, with budgets, constraint values;
    `pruned`: told PRUNED (no values)."""

    values: tuple[float, ...]
    constraints: Mapping[str, float] | None = None
    pruned: bool = False

    @classmethod
    def of(cls, values: Sequence[float], constraints: Mapping[str, float] | None = None) -> Outcome:
        return cls(tuple(float(v) for v in values), None if not constraints else dict(constraints))


def rung_view(metrics: Mapping[str, float]) -> dict[str, float]:
    """A rung's metrics under the names of the full ones: rung_val_accuracy read as val_accuracy."""
    out = {k: v for k, v in metrics.items() if not k.startswith(RUNG_PREFIX)}
    out.update({k[len(RUNG_PREFIX):]: v for k, v in metrics.items() if k.startswith(RUNG_PREFIX)})
    return out


def placeholder_values(objectives: Objectives, metrics: Mapping[str, float]) -> list[float]:
    """A rejected trial's values: the measured ones, and the worst value (0.0, the floor of an accuracy) for an
    objective its untrained file cannot give. Only the study sees them."""
    return [float(metrics[n]) if n in metrics else 0.0 for n in objectives.names]


def rejected_outcome(objectives: Objectives, metrics: Mapping[str, float]) -> Outcome:
    return Outcome.of(placeholder_values(objectives, metrics), objectives.constraints(metrics))


def stopped_outcome(objectives: Objectives, metrics: Mapping[str, float]) -> Outcome:
    constraints = objectives.constraints(rung_view(metrics))
    return Outcome((), None if not constraints else dict(constraints), pruned=True)


def outcome_of_row(row: Mapping[str, Any], objectives: Objectives) -> Outcome | None:
    """The Outcome a trials.jsonl row stands for; None for a failed trial."""
    metrics = row.get("metrics") or {}
    if row["status"] == COMPLETE:
        return Outcome.of(objectives.values(metrics), objectives.constraints(metrics))
    if row["status"] == REJECTED:
        return rejected_outcome(objectives, metrics)
    if row["status"] == STOPPED:
        return stopped_outcome(objectives, metrics)
    return None


def tell(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, outcome: Outcome | None) -> None:
    """Tell the study how the trial ended (constraint values first: samplers read them when it ends). A FrozenTrial
    is one a dead driver left RUNNING, ended on resume."""
    target: optuna.Trial | int = trial if isinstance(trial, optuna.Trial) else trial.number
    if outcome is None:
        study.tell(target, state=TrialState.FAIL)
        return
    set_constraints(trial, study, outcome.constraints)
    if outcome.pruned:
        study.tell(target, state=TrialState.PRUNED)
    else:
        study.tell(target, list(outcome.values))
