"""Pick the one trial to ship from a finished search: budgets first, then a selection rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hwnas.search.pareto import knee_index, non_dominated_mask, to_minimization

RULES = ("best_within_budget", "knee")


def within_budgets(
    points: np.ndarray, directions: Sequence[str], budgets: Mapping[int, float]
) -> np.ndarray:
    """Boolean mask of the rows that meet every budget.

    `budgets` maps a column index to a bound: an upper bound on a 'min' objective (latency_ms
    <= 5) and a lower bound on a 'max' one (val_accuracy >= 0.9). A NaN in a budgeted column
    fails the budget; no budgets means every row passes.
    """
    q = to_minimization(points, directions)
    mask = np.ones(q.shape[0], dtype=bool)
    for col, bound in budgets.items():
        if isinstance(col, bool) or not isinstance(col, (int, np.integer)) or not 0 <= col < q.shape[1]:
            raise ValueError(f"budget column {col!r} must be an objective index in 0..{q.shape[1] - 1}")
        if not np.isfinite(bound):
            raise ValueError(f"budget for column {col} is {bound!r}; it must be a finite number")
        limit = -bound if directions[col] == "max" else bound
        with np.errstate(invalid="ignore"):
            mask &= q[:, col] <= limit  # NaN compares False, so failed rows drop out
    return mask


def select(
    points: np.ndarray,
    directions: Sequence[str],
    *,
    feasible: np.ndarray,
    rule: str,
    primary: int = 0,
) -> int | None:
    """Row index chosen by `rule` among the feasible rows, or None when none is feasible.

    best_within_budget: best value of objective `primary`, ties broken by the other objectives
    in column order, then by the lowest row index.
    knee: the knee (see `search.pareto.knee_index`) of the feasible rows' Pareto front.
    Rows holding a NaN are never chosen.
    """
    if rule not in RULES:
        raise ValueError(f"selection rule {rule!r} is not one of {RULES}")
    q = to_minimization(points, directions)
    feasible = np.asarray(feasible)
    if feasible.dtype != bool or feasible.shape != (q.shape[0],):
        raise ValueError(
            f"feasible must be a bool array of shape ({q.shape[0]},), got {feasible.dtype} {feasible.shape}"
        )
    if isinstance(primary, bool) or not 0 <= primary < q.shape[1]:
        raise ValueError(f"primary {primary!r} must be an objective index in 0..{q.shape[1] - 1}")
    rows = np.flatnonzero(feasible & ~np.isnan(q).any(axis=1))
    if len(rows) == 0:
        return None
    if rule == "best_within_budget":
        keys = [q[rows, primary]] + [q[rows, c] for c in range(q.shape[1]) if c != primary]
        # lexsort takes the primary key last; its sort is stable, so equal rows keep index order.
        return int(rows[np.lexsort(keys[::-1])[0]])
    front = rows[non_dominated_mask(q[rows], ["min"] * q.shape[1])]
    return int(front[knee_index(q[front], ["min"] * q.shape[1])])
