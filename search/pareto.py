"""Pareto dominance and hypervolume over plain numpy arrays.

Convention: `points` is an (n, m) float array, one row per trial, one column per objective;
`directions` gives 'max' or 'min' per column. Every function converts to minimisation once
(`to_minimization`) and works there; references and returned points stay in the original units.

Rows holding a NaN (a failed or unmeasured trial) are never on a front, never dominate another
row and add no hypervolume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIRECTIONS = ("max", "min")
# Rank given by `non_dominated_ranks` to rows that cannot be ranked (they hold a NaN).
UNRANKED = -1


def to_minimization(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Copy of `points` as a float (n, m) array with the 'max' columns negated."""
    pts = np.array(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-D (n, m) array, got shape {pts.shape}")
    if len(directions) != pts.shape[1]:
        raise ValueError(
            f"directions has {len(directions)} entries {list(directions)!r}; points have {pts.shape[1]} columns"
        )
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction {d!r} is not one of {DIRECTIONS}")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return pts * sign


def _reference_to_minimization(reference: Sequence[float] | np.ndarray, directions: Sequence[str]) -> np.ndarray:
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (len(directions),) or not np.all(np.isfinite(ref)):
        raise ValueError(
            f"reference {ref.tolist()!r} must be {len(directions)} finite numbers, one per objective"
        )
    return to_minimization(ref[None, :], directions)[0]


# ----------------------------------------------------------------------------- dominance


def _nd_mask_2d(q: np.ndarray) -> np.ndarray:
    """Non-dominated rows of NaN-free minimised 2-D points by one lexicographic sort, O(n log n)."""
    n = q.shape[0]
    order = np.lexsort((q[:, 1], q[:, 0]))  # by x, then y
    xs, ys = q[order, 0], q[order, 1]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new_group) - 1
    group_min_y = ys[new_group]  # sorted by y inside a group, so the first is the group's minimum
    # Best y among all points with a strictly smaller x: such a point dominates when its y is <= ours.
    best_before = np.r_[np.inf, np.minimum.accumulate(group_min_y)[:-1]]
    dominated = ((group > 0) & (best_before[group] <= ys)) | (group_min_y[group] < ys)
    mask = np.empty(n, dtype=bool)
    mask[order] = ~dominated
    return mask


def _nd_mask_nd(q: np.ndarray) -> np.ndarray:
    """Non-dominated rows of NaN-free minimised points, any m, O(n * front size * m).

    Works on unique rows in lexicographic order: the first remaining row can't be dominated by
    any later row, so it is on the front; every row it dominates is dropped, and repeat.
    """
    unique, inverse = np.unique(q, axis=0, return_inverse=True)
    on_front = np.zeros(len(unique), dtype=bool)
    remaining = np.arange(len(unique))
    values = unique
    while len(remaining):
        on_front[remaining[0]] = True
        # Rows better than the top one somewhere are not dominated by it (the top row itself drops out).
        keep = np.any(values < values[0], axis=1)
        values, remaining = values[keep], remaining[keep]
    return on_front[inverse.reshape(-1)]


def _nd_mask_min(q: np.ndarray) -> np.ndarray:
    """Non-dominated mask of minimised points; NaN rows are False and dominate nothing."""
    valid = ~np.isnan(q).any(axis=1)
    mask = np.zeros(q.shape[0], dtype=bool)
    if valid.any():
        qv = q[valid]
        mask[valid] = _nd_mask_2d(qv) if q.shape[1] == 2 else _nd_mask_nd(qv)
    return mask


def non_dominated_mask(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """True for each row that no other row dominates (the Pareto front).

    Row a dominates b when a is at least as good in every objective and better in one, so
    duplicates of a front point are all on the front.
    """
    return _nd_mask_min(to_minimization(points, directions))


def non_dominated_ranks(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Front index of each row: 0 for the Pareto front, 1 for the front once 0 is removed, ...

    Rows holding a NaN get `UNRANKED` (-1). Peels fronts with the fast mask above, which beats
    Deb's O(m n^2) bookkeeping for the few fronts a search produces.
    """
    q = to_minimization(points, directions)
    ranks = np.full(q.shape[0], UNRANKED, dtype=int)
    left = np.flatnonzero(~np.isnan(q).any(axis=1))
    rank = 0
    while len(left):
        front = _nd_mask_min(q[left])
        ranks[left[front]] = rank
        left = left[~front]
        rank += 1
    return ranks


# ----------------------------------------------------------------------------- hypervolume


def _hv_2d(q: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by minimised 2-D points that all strictly dominate `ref`, by one sweep."""
    if len(q) == 0:
        return 0.0
    order = np.lexsort((q[:, 1], q[:, 0]))
    xs, ys = q[order, 0], q[order, 1]
    # Sweeping in x, each point adds the strip from its x to the next one's, as high as the best y so far.
    best_y = np.minimum.accumulate(ys)
    widths = np.diff(np.r_[xs, ref[0]])
    return float(np.sum(widths * (ref[1] - best_y)))


def _hv_min(q: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of minimised points that all strictly dominate `ref` (HSO slicing).

    Slices along the last objective: between consecutive values of it, the cross-section is the
    (m-1)-D hypervolume of the points at or below the slice. Exponential in m but exact and fast
    for the fronts of a few hundred points and 3-4 objectives a search produces.
    """
    if len(q) == 0:
        return 0.0
    m = q.shape[1]
    if m == 1:
        return float(ref[0] - q[:, 0].min())
    q = np.unique(q[_nd_mask_nd(q)], axis=0)
    if m == 2:
        return _hv_2d(q, ref)
    q = q[np.argsort(q[:, -1], kind="stable")]
    tops = np.r_[q[1:, -1], ref[-1]]
    total = 0.0
    for k in range(len(q)):
        depth = tops[k] - q[k, -1]
        if depth > 0:
            total += depth * _hv_min(q[: k + 1, :-1], ref[:-1])
    return total


def _inside(q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Rows that are finite and strictly better than the reference in every objective."""
    with np.errstate(invalid="ignore"):
        return np.all(np.isfinite(q), axis=1) & np.all(q < ref, axis=1)


def hypervolume(points: np.ndarray, directions: Sequence[str], reference: Sequence[float] | np.ndarray) -> float:
    """Exact volume dominated by `points` and bounded by `reference` (in the original units).

    Rows that are not finite or don't strictly dominate the reference contribute nothing.
    2-D runs in O(n log n); more objectives use exact slicing (see `_hv_min`).
    """
    q = to_minimization(points, directions)
    ref = _reference_to_minimization(reference, directions)
    return _hv_min(q[_inside(q, ref)], ref)


def hypervolume_contributions(
    points: np.ndarray, directions: Sequence[str], reference: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Exclusive hypervolume of each row: what the set loses when that row alone is removed.

    Only front rows can lose anything, and removing one may uncover rows it dominated, so those
    count. Dominated rows, duplicated rows (a twin covers the same volume) and rows outside the
    reference get 0.
    """
    q = to_minimization(points, directions)
    ref = _reference_to_minimization(reference, directions)
    contrib = np.zeros(q.shape[0])
    inside = np.flatnonzero(_inside(q, ref))
    if len(inside) == 0:
        return contrib
    on_front = _nd_mask_min(q[inside])
    front = inside[on_front]
    rest = q[inside[~on_front]]
    # Removing a front row can uncover at most the front of the remaining rows (the second front).
    second = np.unique(rest[_nd_mask_min(rest)], axis=0) if len(rest) else rest
    unique, inverse, counts = np.unique(q[front], axis=0, return_inverse=True, return_counts=True)
    total = _hv_min(unique, ref)
    own = np.zeros(len(unique))
    for j in np.flatnonzero(counts == 1):
        uncovered = second[np.all(unique[j] <= second, axis=1)]
        # max: rounding must not turn a zero contribution into a negative reward
        own[j] = max(0.0, total - _hv_min(np.vstack([np.delete(unique, j, axis=0), uncovered]), ref))
    contrib[front] = own[inverse.reshape(-1)]
    return contrib


def hypervolume_curve(
    points_in_order: np.ndarray, directions: Sequence[str], reference: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Hypervolume of the first k rows for k = 1..n, e.g. against the number of trials.

    Keeps only the running front, so each new row costs a dominance check and, when it lands on
    the front, one hypervolume of the front.
    """
    q = to_minimization(points_in_order, directions)
    ref = _reference_to_minimization(reference, directions)
    inside = _inside(q, ref)
    curve = np.zeros(q.shape[0])
    front = np.empty((0, q.shape[1]))
    value = 0.0
    for k, p in enumerate(q):
        if inside[k] and not np.any(np.all(front <= p, axis=1)):
            front = np.vstack([front[~np.all(p <= front, axis=1)], p])
            value = _hv_min(front, ref)
        curve[k] = value
    return curve


# ----------------------------------------------------------------------------- reference and knee


def nadir_reference(
    front_points: np.ndarray, directions: Sequence[str], margin: float = 0.01
) -> np.ndarray:
    """Reference point just worse than the worst front value of each objective (original units).

    Each objective moves outward by `margin` x its range over the rows; where that range is 0, by
    `margin` x |value|, or by `margin` itself when the value is 0 too. Rows with a NaN are ignored.
    """
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin {margin!r} must be a finite number >= 0")
    q = to_minimization(front_points, directions)
    q = q[~np.isnan(q).any(axis=1)]
    if len(q) == 0:
        raise ValueError("front_points has no row without NaN; a reference needs at least one")
    worst = q.max(axis=0)
    span = worst - q.min(axis=0)
    step = np.where(span > 0, span, np.where(worst != 0, np.abs(worst), 1.0)) * margin
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return (worst + step) * sign


def knee_index(points: np.ndarray, directions: Sequence[str]) -> int:
    """Row index of the knee of the 2-D Pareto front of `points`.

    Both objectives are scaled to [0, 1] over the front (0 = best), so its two extremes sit at
    (0, 1) and (1, 0). The knee is the front point furthest from the line joining them on the
    side of the ideal point (0, 0), i.e. with the largest 1 - x - y: the best trade-off in
    relative terms. Ties (and fronts of one or two points) go to the lowest row index.
    """
    q = to_minimization(points, directions)
    if q.shape[1] != 2:
        raise ValueError(f"knee_index needs 2 objectives, got {q.shape[1]}")
    front = np.flatnonzero(_nd_mask_min(q))
    if len(front) == 0:
        raise ValueError("points have no row without NaN, so there is no front to find a knee on")
    f = q[front]
    lo, span = f.min(axis=0), f.max(axis=0) - f.min(axis=0)
    scaled = (f - lo) / np.where(span > 0, span, 1.0)
    gain = 1.0 - scaled.sum(axis=1)
    best = np.flatnonzero(gain >= gain.max() - 1e-12)
    return int(front[best].min())


# ----------------------------------------------------------------------------- order within a front


def crowding_distance(front_min: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of the rows of one front (minimisation form); extremes get inf."""
    n, m = front_min.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(front_min[:, j], kind="stable")
        span = front_min[order[-1], j] - front_min[order[0], j]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (front_min[order[2:], j] - front_min[order[:-2], j]) / span
    return distance


def eps_net_order(points_min: np.ndarray) -> np.ndarray:
    """Position of each row in the greedy farthest-first order of an epsilon-net (Salinas et al. 2021).

    Columns are scaled to [0, 1] over the rows (a constant column to 0) so no objective's units dominate
    the distances. The first row taken is the smallest on the first column; each next one is the row
    farthest (Euclidean) from all rows taken so far. Ties go to the smallest row index. Rows must be
    finite. Returns positions: 0 for the row taken first.
    """
    q = np.asarray(points_min, dtype=float)
    n = q.shape[0]
    positions = np.zeros(n, dtype=int)
    if n == 0:
        return positions
    lo, span = q.min(axis=0), q.max(axis=0) - q.min(axis=0)
    scaled = np.where(span > 0, (q - lo) / np.where(span > 0, span, 1.0), 0.0)
    taken = np.zeros(n, dtype=bool)
    first = int(np.argmin(scaled[:, 0]))  # argmin/argmax return the first index of a tie
    taken[first] = True
    nearest = np.linalg.norm(scaled - scaled[first], axis=1)  # distance to the closest row taken
    for position in range(1, n):
        pick = int(np.argmax(np.where(taken, -np.inf, nearest)))
        positions[pick] = position
        taken[pick] = True
        nearest = np.minimum(nearest, np.linalg.norm(scaled - scaled[pick], axis=1))
    return positions


TIE_BREAKS = ("eps_net", "crowding")


def multiobjective_priority(points: np.ndarray, directions: Sequence[str], tie_break: str) -> np.ndarray:
    """Priority of each row, 0 = best, a permutation of 0..n-1: by non-dominated front, then within a
    front by `tie_break` ('eps_net': `eps_net_order`; 'crowding': larger crowding distance first, ties
    to the smaller row index). Rows holding a NaN come last, in row order.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break {tie_break!r} is not one of {TIE_BREAKS}")
    q = to_minimization(points, directions)
    ranks = non_dominated_ranks(q, ["min"] * q.shape[1])
    ordered: list[np.ndarray] = []
    for rank in range(int(ranks.max(initial=UNRANKED)) + 1):
        front = np.flatnonzero(ranks == rank)
        if tie_break == "eps_net":
            within = np.argsort(eps_net_order(q[front]), kind="stable")
        else:
            within = np.argsort(-crowding_distance(q[front]), kind="stable")
        ordered.append(front[within])
    ordered.append(np.flatnonzero(ranks == UNRANKED))
    priority = np.empty(q.shape[0], dtype=int)
    priority[np.concatenate(ordered)] = np.arange(q.shape[0])
    return priority
