"""Latency-first: which budgets a candidate's untrained file can already be held to, and whether it misses one.

A candidate's compressed file made from untrained weights has the graph of the trained one (pruning keeps a fixed
share of each layer group's channels, the rank knob a fixed rank, a format its kernels): its latency, size,
parameters and MACs are those of the file training would make. A budget on any of them is decided before
training; a budget on accuracy is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hwnas.search.objectives import Objectives

# What the pipeline's untrained file reports (evaluators/pipeline.py `_early`): independent of the weights.
UNTRAINED_METRICS = frozenset({
    "latency_ms", "latency_p90_ms", "latency_p99_ms", "latency_mean_ms", "model_bytes", "params", "macs", "energy_j",
})


def pre_training_bounds(objectives: Objectives) -> list[str]:
    """The budgeted metrics an untrained file gives (objective.latency_budget_ms, objective.budgets)."""
    return [name for name in objectives.bounds if name in UNTRAINED_METRICS]


def over_budget(objectives: Objectives, metrics: Mapping[str, float], names: Sequence[str]) -> list[str]:
    """The budgets among `names` the untrained file's `metrics` miss (a metric it did not report misses none:
    the trained file is held to it)."""
    constraints = objectives.constraints(metrics) or {}
    return [n for n in names if n in metrics and constraints.get(n, 0.0) > 0]
