"""Pareto maths against brute force: pairwise dominance, peeling, and exact grid volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwnas.search.pareto import (
    UNRANKED,
    hypervolume,
    hypervolume_contributions,
    hypervolume_curve,
    knee_index,
    nadir_reference,
    non_dominated_mask,
    non_dominated_ranks,
    to_minimization,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def point_sets(draw, m=None, max_n=25, nan=False):
    """(points, directions): small integer grid values so ties and duplicates are common."""
    m = draw(st.sampled_from([2, 3])) if m is None else m
    n = draw(st.integers(0, max_n))
    values = draw(st.lists(st.lists(st.integers(0, 5), min_size=m, max_size=m), min_size=n, max_size=n))
    pts = np.array(values, dtype=float).reshape(n, m)
    if nan and n:
        rows = draw(st.lists(st.integers(0, n - 1), max_size=3))
        pts[rows, draw(st.integers(0, m - 1))] = np.nan
    directions = draw(st.lists(st.sampled_from(["min", "max"]), min_size=m, max_size=m))
    return pts, directions


def brute_mask(points, directions):
    q = to_minimization(points, directions)
    n = len(q)
    ok = ~np.isnan(q).any(axis=1)
    mask = ok.copy()
    for i, j in itertools.product(range(n), range(n)):
        if ok[i] and ok[j] and np.all(q[j] <= q[i]) and np.any(q[j] < q[i]):
            mask[i] = False
    return mask


def brute_hypervolume(points, directions, reference):
    """Exact union volume of the boxes [p, ref] on the grid of all coordinates (compression)."""
    q = to_minimization(points, directions)
    ref = to_minimization(np.asarray(reference, dtype=float)[None, :], directions)[0]
    q = q[np.all(np.isfinite(q), axis=1) & np.all(q < ref, axis=1)]
    if len(q) == 0:
        return 0.0
    axes = [np.unique(np.r_[q[:, k], ref[k]]) for k in range(q.shape[1])]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        low = np.array([axes[k][c] for k, c in enumerate(cell)])
        if np.any(np.all(q <= low, axis=1)):
            total += np.prod([axes[k][c + 1] - axes[k][c] for k, c in enumerate(cell)])
    return float(total)


def ref_for(directions):
    """A reference strictly worse than every generated value (they lie in 0..5)."""
    return np.array([6.0 if d == "min" else -1.0 for d in directions])


# ----------------------------------------------------------------------------- validation


def test_to_minimization_negates_only_max_columns():
    got = to_minimization(np.array([[1.0, 2.0, 3.0]]), ["max", "min", "max"])
    assert got.tolist() == [[-1.0, 2.0, -3.0]]


@pytest.mark.parametrize(
    ("points", "directions", "match"),
    [
        (np.zeros((3, 2)), ["min", "maximise"], "'maximise' is not one of"),
        (np.zeros((3, 2)), ["min"], "directions has 1 entries"),
        (np.zeros(3), ["min"], "2-D"),
    ],
)
def test_bad_input_names_the_problem(points, directions, match):
    with pytest.raises(ValueError, match=match):
        non_dominated_mask(points, directions)


def test_reference_must_match_objectives():
    with pytest.raises(ValueError, match="reference"):
        hypervolume(np.zeros((2, 2)), ["min", "min"], [1.0])


# ----------------------------------------------------------------------------- dominance


@SETTINGS
@given(point_sets(nan=True))
def test_non_dominated_mask_matches_pairwise_check(case):
    points, directions = case
    np.testing.assert_array_equal(non_dominated_mask(points, directions), brute_mask(points, directions))


@SETTINGS
@given(point_sets(m=4, max_n=15))
def test_non_dominated_mask_four_objectives(case):
    points, directions = case
    np.testing.assert_array_equal(non_dominated_mask(points, directions), brute_mask(points, directions))


def test_duplicates_of_a_front_point_are_all_on_the_front():
    pts = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [np.nan, 0.0]])
    assert non_dominated_mask(pts, ["min", "min"]).tolist() == [True, True, False, False]


@SETTINGS
@given(point_sets(nan=True))
def test_ranks_match_repeated_peeling(case):
    points, directions = case
    expected = np.full(len(points), UNRANKED)
    left = np.flatnonzero(~np.isnan(points).any(axis=1))
    rank = 0
    while len(left):
        front = brute_mask(points[left], directions)
        expected[left[front]] = rank
        left, rank = left[~front], rank + 1
    np.testing.assert_array_equal(non_dominated_ranks(points, directions), expected)


# ----------------------------------------------------------------------------- hypervolume


@SETTINGS
@given(point_sets(max_n=10, nan=True))
def test_hypervolume_matches_grid_brute_force(case):
    points, directions = case
    ref = ref_for(directions)
    assert hypervolume(points, directions, ref) == pytest.approx(brute_hypervolume(points, directions, ref))


@settings(max_examples=25, deadline=None)
@given(point_sets(m=4, max_n=7))
def test_hypervolume_four_objectives(case):
    points, directions = case
    ref = ref_for(directions)
    assert hypervolume(points, directions, ref) == pytest.approx(brute_hypervolume(points, directions, ref))


@SETTINGS
@given(point_sets(), st.data())
def test_hypervolume_of_set_equals_that_of_front_and_ignores_dominated_additions(case, data):
    points, directions = case
    ref = ref_for(directions)
    hv = hypervolume(points, directions, ref)
    assert hypervolume(points[non_dominated_mask(points, directions)], directions, ref) == pytest.approx(hv)
    if len(points):
        # Worsen copies of existing rows: they are dominated (or duplicates), so add no volume.
        worse = to_minimization(points, directions) + data.draw(
            st.lists(st.integers(0, 3), min_size=points.size, max_size=points.size)
            .map(lambda v: np.array(v, dtype=float).reshape(points.shape))
        )
        worse = to_minimization(worse, directions)  # back to original units: negation is its own inverse
        assert hypervolume(np.vstack([points, worse]), directions, ref) == pytest.approx(hv)


def test_points_not_strictly_inside_the_reference_add_nothing():
    ref = [4.0, 4.0]
    assert hypervolume(np.array([[4.0, 1.0], [5.0, 0.0], [1.0, 4.0]]), ["min", "min"], ref) == 0.0
    assert hypervolume(np.array([[4.0, 1.0], [3.0, 3.0]]), ["min", "min"], ref) == pytest.approx(1.0)


def test_hypervolume_in_original_units_with_max_objective():
    # accuracy (max) against latency (min), reference accuracy 0.5 / latency 10 ms.
    pts = np.array([[0.9, 4.0], [0.7, 2.0]])
    # union of [0.5,0.9]x[4,10] and [0.5,0.7]x[2,10] = 0.4*6 + 0.2*2
    assert hypervolume(pts, ["max", "min"], [0.5, 10.0]) == pytest.approx(2.8)


@SETTINGS
@given(point_sets(max_n=10))
def test_contributions_equal_leave_one_out_loss(case):
    points, directions = case
    ref = ref_for(directions)
    contrib = hypervolume_contributions(points, directions, ref)
    total = hypervolume(points, directions, ref)
    expected = [total - hypervolume(np.delete(points, i, axis=0), directions, ref) for i in range(len(points))]
    np.testing.assert_allclose(contrib, expected, atol=1e-9)


@SETTINGS
@given(point_sets(m=2, max_n=20))
def test_2d_contributions_sum_to_at_most_the_total_and_zero_off_front(case):
    points, directions = case
    ref = ref_for(directions)
    contrib = hypervolume_contributions(points, directions, ref)
    assert np.all(contrib >= 0)
    assert contrib.sum() <= hypervolume(points, directions, ref) + 1e-9
    assert np.all(contrib[~non_dominated_mask(points, directions)] == 0)


def test_2d_contributions_of_a_staircase():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.0, 3.0]])
    got = hypervolume_contributions(pts, ["min", "min"], [4.0, 4.0])
    # each step owns its 1x1 corner; the extremes also own the strip to the reference.
    assert got.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_contribution_counts_what_a_removed_point_uncovers():
    # Without (0, 0) the set still has (0, 1): (0, 0) owns only the 6 x 1 strip below it.
    pts = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert hypervolume_contributions(pts, ["min", "min"], [6.0, 6.0]).tolist() == [6.0, 0.0]


@SETTINGS
@given(point_sets(max_n=15, nan=True))
def test_hypervolume_curve_is_hypervolume_of_each_prefix(case):
    points, directions = case
    ref = ref_for(directions)
    expected = [hypervolume(points[: k + 1], directions, ref) for k in range(len(points))]
    np.testing.assert_allclose(hypervolume_curve(points, directions, ref), expected, atol=1e-9)


# ----------------------------------------------------------------------------- reference and knee


@pytest.mark.parametrize(
    ("front", "directions", "margin", "expected"),
    [
        # worst of each objective, moved outward by 10% of the front's range
        ([[1.0, 10.0], [3.0, 5.0]], ["min", "min"], 0.1, [3.2, 10.5]),
        ([[0.9, 4.0], [0.7, 2.0]], ["max", "min"], 0.5, [0.6, 5.0]),
        # zero range: margin x |value|, or margin itself at 0
        ([[2.0, 0.0]], ["min", "max"], 0.1, [2.2, -0.1]),
        ([[-2.0, 5.0], [-2.0, 5.0]], ["max", "max"], 0.1, [-2.2, 4.5]),
        # NaN rows are ignored; margin 0 keeps the worst values
        ([[1.0, 1.0], [np.nan, 9.0], [2.0, 0.5]], ["min", "min"], 0.0, [2.0, 1.0]),
    ],
)
def test_nadir_reference(front, directions, margin, expected):
    got = nadir_reference(np.array(front), directions, margin=margin)
    np.testing.assert_allclose(got, expected)


def test_nadir_reference_rejects_empty_and_negative_margin():
    with pytest.raises(ValueError, match="no row"):
        nadir_reference(np.full((2, 2), np.nan), ["min", "min"])
    with pytest.raises(ValueError, match="margin"):
        nadir_reference(np.ones((2, 2)), ["min", "min"], margin=-1.0)


def test_nadir_reference_dominated_by_every_front_point():
    front = np.array([[0.95, 8.0], [0.9, 3.0], [0.8, 1.0]])
    ref = nadir_reference(front, ["max", "min"])
    assert np.all(front[:, 0] > ref[0]) and np.all(front[:, 1] < ref[1])
    assert np.all(hypervolume_contributions(front, ["max", "min"], ref) > 0)


def test_knee_of_an_l_shaped_front():
    # accuracy (max) vs latency (min): accuracy saturates at 0.9 after 2 ms; the corner is row 2.
    pts = np.array(
        [[0.10, 0.5], [0.50, 1.0], [0.89, 2.0], [0.895, 6.0], [0.90, 10.0], [0.40, 9.0], [0.2, 3.0]]
    )
    assert knee_index(pts, ["max", "min"]) == 2


def test_knee_ignores_dominated_rows_and_rejects_three_objectives():
    pts = np.array([[5.0, 5.0], [0.0, 4.0], [4.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert knee_index(pts, ["min", "min"]) == 3  # lowest of two duplicates
    with pytest.raises(ValueError, match="2 objectives"):
        knee_index(np.ones((2, 3)), ["min"] * 3)
