"""Helpers shared by the samplers in this package.

* finite value grids of Optuna distributions (the RL controller picks among grid points),
* uniform draws and "a different value" draws from a distribution with a caller-owned RNG,
* `TrialIndex`: the union search space of a study and the parameter sets it has already spent
  (or is spending) an evaluation on, kept incrementally so asking stays cheap at 1,000 trials.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import Study
from optuna.trial import TrialState

from hwnas.spaces.candidate import canonical

# Trials whose parameters can no longer change: indexed once, never re-read.
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def grid(distribution: BaseDistribution, *, n_bins: int, max_int_bins: int) -> list[Any]:
    """The finite values a discrete policy chooses among, in increasing order (categorical: choice order).

    Categorical -> its choices; int -> every value (respecting `step`) when there are at most
    `max_int_bins`, else `max_int_bins` evenly (or log-) spaced values snapped to the step; float
    -> `n_bins` evenly (or log-) spaced values, or every step value when a step gives fewer.
    """
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        low, high, step = distribution.low, distribution.high, distribution.step
        n_values = (high - low) // step + 1
        if n_values <= max_int_bins:
            return [low + i * step for i in range(n_values)]
        raw = (
            np.geomspace(low, high, max_int_bins)
            if distribution.log
            else np.linspace(low, high, max_int_bins)
        )
        snapped = low + np.round((raw - low) / step).astype(np.int64) * step
        return sorted({int(v) for v in np.clip(snapped, low, high)})
    if isinstance(distribution, FloatDistribution):
        lo, hi = distribution.low, distribution.high
        if lo == hi:
            return [float(lo)]
        if distribution.step is not None:
            fstep = distribution.step
            n_values = int(round((hi - lo) / fstep)) + 1
            idx = (
                np.arange(n_values) if n_values <= n_bins else np.round(np.linspace(0, n_values - 1, n_bins))
            )
            return sorted({float(min(lo + k * fstep, hi)) for k in idx})
        raw = np.geomspace(lo, hi, n_bins) if distribution.log else np.linspace(lo, hi, n_bins)
        return [float(v) for v in np.clip(raw, lo, hi)]
    raise ValueError(f"distribution {distribution!r} is not supported; allowed: Categorical, Int, Float")


def nearest_index(distribution: BaseDistribution, values: list[Any], value: Any) -> int | None:
    """Index of the grid point that `value` falls on (nearest, in log space for log distributions).

    None when a categorical value is not among the choices (e.g. the space changed).
    """
    if isinstance(distribution, CategoricalDistribution):
        for i, choice in enumerate(values):
            if choice == value and type(choice) is type(value):
                return i
        return None
    points = np.asarray(values, dtype=float)
    x = float(value)
    if distribution.log:  # type: ignore[attr-defined]
        points, x = np.log(points), math.log(x)
    return int(np.argmin(np.abs(points - x)))


def sample_uniform(distribution: BaseDistribution, rng: np.random.Generator) -> Any:
    """One value drawn uniformly from the distribution (log-uniformly for log distributions)."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[int(rng.integers(len(distribution.choices)))]
    if isinstance(distribution, IntDistribution):
        low, high, step = distribution.low, distribution.high, distribution.step
        if distribution.log:  # Optuna's rule: log-uniform on [low - 0.5, high + 0.5], rounded.
            x = math.exp(rng.uniform(math.log(low - 0.5), math.log(high + 0.5)))
            return int(min(max(round(x), low), high))
        return int(low + step * int(rng.integers((high - low) // step + 1)))
    if isinstance(distribution, FloatDistribution):
        lo, hi = distribution.low, distribution.high
        if distribution.step is not None:
            k = int(rng.integers(int(round((hi - lo) / distribution.step)) + 1))
            return float(min(lo + k * distribution.step, hi))
        if distribution.log:
            return float(min(max(math.exp(rng.uniform(math.log(lo), math.log(hi))), lo), hi))
        return float(rng.uniform(lo, hi))
    raise ValueError(f"distribution {distribution!r} is not supported; allowed: Categorical, Int, Float")


def sample_other(distribution: BaseDistribution, current: Any, rng: np.random.Generator) -> Any:
    """A value different from `current` (uniform over the others where they are countable).

    Returns `current` only when the distribution holds a single value.
    """
    if distribution.single():
        return current
    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        at = nearest_index(distribution, choices, current)
        if at is None:
            return choices[int(rng.integers(len(choices)))]
        pick = int(rng.integers(len(choices) - 1))
        return choices[pick + (pick >= at)]
    if isinstance(distribution, IntDistribution) and not distribution.log:
        low, step = distribution.low, distribution.step
        n_values = (distribution.high - low) // step + 1
        at = min(max((int(current) - low) // step, 0), n_values - 1)
        pick = int(rng.integers(n_values - 1))
        return int(low + (pick + (pick >= at)) * step)
    # Log ints and floats: a uniform draw almost surely differs; retry the rare tie.
    for _ in range(64):
        value = sample_uniform(distribution, rng)
        if value != current:
            return value
    return value


class TrialIndex:
    """Union search space and already-evaluated parameter sets of one study, kept incrementally.

    Finished trials are read once; running trials are re-read on every `refresh` (their parameters
    may still grow). `contains(params)` asks whether some trial's parameters all equal `params`:
    a trial whose parameter names are a subset of `params`' names matches on those names. Names a
    proposal carries for an inactive branch are thereby ignored, which is how Optuna uses them.
    """

    def __init__(self) -> None:
        self.distributions: dict[str, BaseDistribution] = {}
        self._done: set[int] = set()
        self._finished: dict[frozenset[str], set[str]] = {}
        self._running: dict[frozenset[str], set[str]] = {}

    def refresh(self, study: Study, current_number: int) -> None:
        self._running = {}
        # No trial cache (the public get_trials reads the storage): the cache is filled at `ask`, and
        # trials asked before this one may have got their parameters since (parallel trials suggested in turn).
        for t in study.get_trials(deepcopy=False):
            if t.number == current_number or t.number in self._done or not t.params:
                continue
            if t.state in _FINISHED:
                self._done.add(t.number)
                target = self._finished
            elif t.state == TrialState.RUNNING:
                target = self._running
            else:  # WAITING trials have no parameters yet
                continue
            # Latest trial wins: the space may be redefined between trials.
            self.distributions.update(t.distributions)
            target.setdefault(frozenset(t.params), set()).add(canonical(t.params))

    def contains(self, params: Mapping[str, Any]) -> bool:
        names = params.keys()
        for index in (self._finished, self._running):
            for keys, seen in index.items():
                if keys <= names and canonical({k: params[k] for k in keys}) in seen:
                    return True
        return False
