"""Multi-objective asynchronous successive halving (MO-ASHA; Schmucker et al. 2021, Salinas et al. 2021).

The stopping rule of asynchronous successive halving, with a multi-objective order in place of a single
metric: when a trial reaches rung epoch r, its objective values join those of every trial judged at r
so far; all of them are ordered by `multiobjective_priority` (non-dominated front, then the tie-break
within a front); the trial's rank is position / n, where position is the number of trials ahead of it
and n counts it too. It goes on iff rank < 1 / reduction_factor: for a whole-number factor, the top
ceil(n / reduction_factor) of n go on (the (1 - 1/rf) quantile cutoff of Ray Tune's ASHA, taken over the rung
with the arriving trial counted; tests/test_moasha.py pins it). The first trial at a rung always goes on, the
second only if it ranks first. No trial waits for others (asynchronous): a trial is judged against whoever reached the rung first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from hwnas.search.pareto import TIE_BREAKS, multiobjective_priority
from hwnas.search.schedulers.base import Decision, check_directions, check_latency_first


def check_rungs(rungs: Any) -> tuple[int, ...]:
    # Any Sequence (a ListConfig too); bool is an int to Python but not an epoch.
    ok = isinstance(rungs, Sequence) and not isinstance(rungs, str) and len(rungs) > 0
    found = list(rungs) if ok else rungs
    ok = ok and all(isinstance(r, Integral) and not isinstance(r, bool) and int(r) >= 1 for r in found)
    ok = ok and all(a < b for a, b in zip(found, found[1:], strict=False))
    if not ok:
        raise ValueError(
            f"scheduler.rungs: {found!r} is not allowed; allowed: a non-empty list of strictly increasing integers >= 1"
        )
    return tuple(int(r) for r in found)


def check_reduction_factor(reduction_factor: Any) -> float:
    rf = reduction_factor
    if isinstance(rf, bool) or not isinstance(rf, Real) or not math.isfinite(rf) or rf <= 1:
        raise ValueError(f"scheduler.reduction_factor: {rf!r} is not allowed; allowed: a finite number > 1")
    return float(rf)


def check_tie_break(tie_break: Any) -> str:
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"scheduler.tie_break: {tie_break!r} is not allowed; allowed: one of {', '.join(TIE_BREAKS)}")
    return str(tie_break)


class MOASHA:
    """The Scheduler (base.py) of MO-ASHA. State: per rung the values of each key judged there, in
    order, and every decision (what a resumed sweep restores and a re-run trial replays)."""

    def __init__(
        self,
        *,
        rungs: Sequence[int],
        reduction_factor: float = 3,
        tie_break: str = "eps_net",
        latency_first: bool = True,
        directions: Sequence[str],
    ) -> None:
        self.rungs = check_rungs(rungs)
        self.reduction_factor = check_reduction_factor(reduction_factor)
        self.tie_break = check_tie_break(tie_break)
        self.latency_first = check_latency_first(latency_first)
        self.directions = check_directions(directions, required=True)
        self._reset()

    def _reset(self) -> None:
        self._points: dict[int, dict[str, tuple[float, ...]]] = {r: {} for r in self.rungs}
        self._decisions: dict[tuple[str, int], Decision] = {}

    def _values(self, key: str, epoch: int, values: Iterable[float]) -> tuple[float, ...]:
        # Wrong epoch or arity is the caller's bug, not a trial to stop.
        if epoch not in self._points:
            raise ValueError(f"epoch {epoch!r} (key {key!r}) is not a rung; allowed: one of {list(self.rungs)}")
        found = tuple(float(v) for v in values)
        if len(found) != len(self.directions):
            raise ValueError(
                f"values {list(found)!r} (key {key!r}, epoch {epoch}) has {len(found)} entries; "
                f"allowed: {len(self.directions)}, one per objective {list(self.directions)}"
            )
        return found

    def decide(self, key: str, epoch: int, values: Sequence[float]) -> bool:
        seen = self._decisions.get((key, epoch))
        if seen is not None:
            return seen.keep
        found = self._values(key, epoch, values)
        rung = self._points[epoch]
        rung[key] = found  # a new key: the last row below
        keep = all(math.isfinite(v) for v in found) and self._in_top(rung)
        self._decisions[(key, epoch)] = Decision(key, epoch, found, keep)
        return keep

    def _in_top(self, rung: Mapping[str, tuple[float, ...]]) -> bool:
        """Whether the rung's last row ranks in the top 1 / reduction_factor of the rung."""
        points = np.array(list(rung.values()), dtype=float)
        # A row that cannot be ranked (NaN, inf) still counts as judged, behind every finite row.
        points[~np.all(np.isfinite(points), axis=1)] = np.nan
        priority = multiobjective_priority(points, self.directions, self.tie_break)
        position = int(np.sum(priority < priority[-1]))
        # position / n < 1 / reduction_factor, without the rounding of two divisions. Not <=: at n = k * rf that
        # would keep k + 1 of n (3 of 6 at rf 3), half again the share successive halving promises.
        return position * self.reduction_factor < len(points)

    def restore(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replaces the state by the records' (recorded decisions are taken as they are, not recomputed);
        a repeated (key, epoch) keeps its first record."""
        self._reset()
        for record in records:
            d = Decision.from_record(record)
            if (d.key, d.epoch) in self._decisions:
                continue
            found = self._values(d.key, d.epoch, d.values)
            self._points[d.epoch][d.key] = found
            self._decisions[(d.key, d.epoch)] = Decision(d.key, d.epoch, found, d.keep)

    def counts(self) -> dict[int, dict[str, int]]:
        stopped = {r: 0 for r in self.rungs}
        for d in self._decisions.values():
            stopped[d.epoch] += not d.keep
        return {r: {"judged": len(self._points[r]), "stopped": stopped[r]} for r in self.rungs}

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Every decision, in the order made (or restored)."""
        return tuple(self._decisions.values())
