"""Budget masks and selection rules, table-driven."""

from __future__ import annotations

import numpy as np
import pytest

from hwnas.search.selection import RULES, select, within_budgets

NAN = np.nan
# val_accuracy (max), latency_ms (min)
DIRS = ["max", "min"]
TRIALS = np.array(
    [
        [0.80, 1.0],  # 0: fast, weak
        [0.90, 2.0],  # 1: knee
        [0.92, 6.0],  # 2
        [0.93, 9.0],  # 3: most accurate
        [0.85, 5.0],  # 4: dominated by 1
        [NAN, 0.5],  # 5: failed
    ]
)


@pytest.mark.parametrize(
    ("budgets", "expected"),
    [
        ({}, [True] * 6),
        # latency is minimised: its budget is an upper bound (inclusive)
        ({1: 5.0}, [True, True, False, False, True, True]),
        # accuracy is maximised: its budget is a lower bound; a NaN fails it
        ({0: 0.9}, [False, True, True, True, False, False]),
        ({0: 0.9, 1: 6.0}, [False, True, True, False, False, False]),
        ({1: 0.1}, [False] * 6),
    ],
)
def test_within_budgets(budgets, expected):
    assert within_budgets(TRIALS, DIRS, budgets).tolist() == expected


@pytest.mark.parametrize(
    ("budgets", "match"),
    [({2: 1.0}, "budget column 2"), ({-1: 1.0}, "budget column -1"), ({1: NAN}, "finite")],
)
def test_within_budgets_rejects_bad_budgets(budgets, match):
    with pytest.raises(ValueError, match=match):
        within_budgets(TRIALS, DIRS, budgets)


@pytest.mark.parametrize(
    ("budgets", "rule", "primary", "expected"),
    [
        ({}, "best_within_budget", 0, 3),  # most accurate overall
        ({1: 5.0}, "best_within_budget", 0, 1),  # most accurate under 5 ms
        ({1: 5.0}, "best_within_budget", 1, 0),  # fastest (failed row 5 is never chosen)
        ({0: 0.91}, "best_within_budget", 1, 2),  # fastest above 91 %
        ({}, "knee", 0, 1),
        ({0: 0.91}, "knee", 0, 2),  # front {2, 3}: two points, lowest index wins the tie
        ({1: 0.1}, "best_within_budget", 0, None),
        ({1: 0.1}, "knee", 0, None),
    ],
)
def test_select(budgets, rule, primary, expected):
    feasible = within_budgets(TRIALS, DIRS, budgets)
    assert select(TRIALS, DIRS, feasible=feasible, rule=rule, primary=primary) == expected


def test_best_within_budget_breaks_ties_by_the_other_objectives_then_index():
    pts = np.array([[0.9, 3.0], [0.9, 2.0], [0.9, 2.0], [0.8, 1.0]])
    feasible = np.ones(4, dtype=bool)
    assert select(pts, DIRS, feasible=feasible, rule="best_within_budget", primary=0) == 1


def test_select_only_failed_rows_feasible_gives_none():
    feasible = np.array([False] * 5 + [True])
    assert select(TRIALS, DIRS, feasible=feasible, rule="knee") is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "pareto_best"}, "'pareto_best' is not one of " + str(RULES).replace("(", r"\(").replace(")", r"\)")),
        ({"rule": "knee", "primary": 2}, "primary 2"),
        ({"rule": "knee", "feasible": np.ones(3, dtype=bool)}, "feasible must be"),
        ({"rule": "knee", "feasible": np.ones(6)}, "feasible must be"),
    ],
)
def test_select_rejects_bad_arguments(kwargs, match):
    args = {"feasible": np.ones(6, dtype=bool), **kwargs}
    with pytest.raises(ValueError, match=match):
        select(TRIALS, DIRS, **args)
