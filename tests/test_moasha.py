"""MO-ASHA's decision half (search/schedulers/) and the orders it ranks by (search/pareto.py), by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from hwnas.search.pareto import (
    crowding_distance,
    eps_net_order,
    multiobjective_priority,
    non_dominated_ranks,
)
from hwnas.search.plugins import conforms
from hwnas.search.schedulers import MOASHA, Decision, FullTraining, Scheduler

ACC_LAT = ("max", "min")  # accuracy up, latency down

# Front 0: rows 2 (a), 0 (b), 4 (c), 7 (e), 6 (d); front 1: rows 1 (f), 5 (g); front 2: row 8; row 3 has a NaN.
# Within front 0 (scaled to [0, 1]): a (0, 1), b (.1, .85), c (.5, .45), e (.55, .4), d (1, 0).
#   eps-net: a (best on the first column), d (farthest from a), c (farthest from both), b, e.
#   crowding: a, d (inf; smaller row first), b 1.05, e .95, c .9.
# Front 1: eps-net takes g first (better accuracy); crowding has both at inf, so row order: f, g.
MIXED = [
    (0.9, 8.5), (0.4, 5.0), (1.0, 10.0), (math.nan, 3.0), (0.5, 4.5), (0.8, 9.0), (0.0, 0.0), (0.45, 4.0), (0.3, 10.0),
]
# Duplicates: minimised (-.5, 1) twice and (-.6, 2). eps-net: row 2 first (smallest -acc), rows 0 and 1
# are equally far (tie: row 0). Crowding: every row is an extreme on some column (all inf), so row order.
TWINS = [(0.5, 1.0), (0.5, 1.0), (0.6, 2.0)]


@pytest.mark.parametrize(
    ("points", "tie_break", "expected"),
    [
        (MIXED, "eps_net", [3, 6, 0, 8, 2, 5, 1, 4, 7]),
        (MIXED, "crowding", [2, 5, 0, 8, 4, 6, 1, 3, 7]),
        (TWINS, "eps_net", [1, 2, 0]),
        (TWINS, "crowding", [0, 1, 2]),
        ([(0.7, 3.0)], "eps_net", [0]),
        ([(math.nan, 1.0), (0.1, 9.0)], "crowding", [1, 0]),  # NaN last even behind a poor row
        ([(0.2, 5.0), (0.9, 1.0), (0.5, 3.0)], "crowding", [2, 0, 1]),  # three fronts of one
    ],
)
def test_priority_by_hand(points, tie_break, expected):
    got = multiobjective_priority(np.array(points), ACC_LAT, tie_break)
    assert got.tolist() == expected


def test_priority_refuses_unknown_tie_break():
    with pytest.raises(ValueError, match="tie_break"):
        multiobjective_priority(np.array(TWINS), ACC_LAT, "random")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=20),
    st.sampled_from(["eps_net", "crowding"]),
)
def test_priority_is_a_permutation_by_front(rows, tie_break):
    points = np.array(rows, dtype=float)
    priority = multiobjective_priority(points, ACC_LAT, tie_break)
    assert sorted(priority.tolist()) == list(range(len(rows)))
    ranks = non_dominated_ranks(points, ACC_LAT)
    # A row on an earlier front always comes first.
    for i in range(len(rows)):
        for j in range(len(rows)):
            if ranks[i] < ranks[j]:
                assert priority[i] < priority[j]


@pytest.mark.parametrize(
    ("points_min", "expected"),
    [
        # Scaled: (.5, 0), (0, 1), (0, 0), (1, .5), (1, 1). Row 1 first (ties row 2 on column 0, smaller index);
        # rows 0 and 3 tie at sqrt(1.25) from it (row 0); then row 4 (1 from both); rows 2 and 3 tie at .5 (row 2).
        # Unscaled, column 1 (hundreds) would pick row 2 second.
        ([(2, 100), (0, 300), (0, 100), (4, 200), (4, 300)], [1, 0, 3, 4, 2]),
        # A constant column scales to 0; rows 1 and 2 tie at .5 from row 0.
        ([(5, 1), (5, 0), (5, 2)], [0, 1, 2]),
        ([(3, 3)], [0]),
    ],
)
def test_eps_net_order_by_hand(points_min, expected):
    assert eps_net_order(np.array(points_min, dtype=float)).tolist() == expected


def test_eps_net_order_of_nothing():
    assert eps_net_order(np.empty((0, 2))).tolist() == []


def test_crowding_distance_by_hand():
    # The MIXED front 0 in minimisation form, rows a, b, c, e, d.
    front = np.array([(-1.0, 10.0), (-0.9, 8.5), (-0.5, 4.5), (-0.45, 4.0), (0.0, 0.0)])
    np.testing.assert_allclose(crowding_distance(front), [np.inf, 1.05, 0.9, 0.95, np.inf])
    assert crowding_distance(front[:2]).tolist() == [np.inf, np.inf]


# ----------------------------------------------------------------------------- MO-ASHA


def moasha(**kwargs):
    kwargs.setdefault("rungs", [1])
    kwargs.setdefault("directions", ACC_LAT)
    return MOASHA(**kwargs)


def test_both_schedulers_have_the_interface():
    assert conforms(moasha(), Scheduler)
    assert conforms(FullTraining(), Scheduler)


def test_first_trial_at_a_rung_continues():
    assert moasha(rungs=[2, 4]).decide("a", 4, [0.1, 99.0]) is True


@pytest.mark.parametrize(("tie_break", "c_keeps"), [("eps_net", True), ("crowding", False)])
def test_dominated_stops_and_front_continues(tie_break, c_keeps):
    s = moasha(reduction_factor=3, tie_break=tie_break)
    assert s.decide("a", 1, [0.8, 5.0]) is True
    assert s.decide("b", 1, [0.7, 6.0]) is False  # dominated: 1/2, not < 1/3
    # On the front with a. eps-net takes c first (best accuracy): 0/3, kept. Crowding has both at inf, so row
    # order puts a first: 1/3, exactly at the boundary, not < 1/3: stopped (the top ceil(3/3) = 1 goes on).
    assert s.decide("c", 1, [0.9, 7.0]) is c_keeps
    # d dominates a and b; front {c, d}: both take c first (best accuracy; crowding: both inf, row order).
    # 1/4 < 1/3: kept just inside the boundary.
    assert s.decide("d", 1, [0.85, 4.0]) is True
    assert s.counts() == {1: {"judged": 4, "stopped": 2 - c_keeps}}


# Nine trials at one rung, reduction factor 3: kept iff position / n < 1/3. (position, n) by hand, then the
# decision by eps-net and by crowding (they differ on t3 and t9, each exactly at the 1/3 boundary under crowding).
NINE = [
    ((0.50, 10.0), True, True),  # alone: 0/1
    ((0.40, 12.0), False, False),  # dominated by t1: 1/2
    ((0.60, 11.0), True, False),  # front {t1, t3}: 0/3 (eps: best accuracy first) or 1/3 (crowding: row order)
    ((0.55, 9.0), True, True),  # dominates t1; front {t3, t4}: 1/4, just inside
    ((0.30, 20.0), False, False),  # dominated by all: 4/5
    ((0.70, 15.0), True, True),  # best accuracy: 0/6 (eps) or 1/6 (crowding: t4, t6 at inf, t3 finite)
    ((0.58, 10.0), False, False),  # front {t6, t3, t7, t4}: taken fourth by both, 3/7
    ((0.65, 8.0), True, True),  # dominates t3, t4, t7; front {t6, t8}: 1/8
    ((0.62, 9.5), True, False),  # dominated by t8 only; front 1 {t4, t9}: 2/9 (eps) or 3/9 (crowding, the edge)
]


@pytest.mark.parametrize(("tie_break", "column", "stopped"), [("eps_net", 1, 3), ("crowding", 2, 5)])
def test_nine_trials_by_hand(tie_break, column, stopped):
    s = moasha(reduction_factor=3, tie_break=tie_break)
    got = [s.decide(f"t{i + 1}", 1, row[0]) for i, row in enumerate(NINE)]
    assert got == [row[column] for row in NINE]
    assert s.counts() == {1: {"judged": 9, "stopped": stopped}}


@pytest.mark.parametrize(("tie_break", "keep"), [("eps_net", True), ("crowding", False)])
def test_tie_break_decides(tie_break, keep):
    # MIXED's front 0 arriving a, b, d, e, c: c is 3rd by eps-net (2/5 < 1/2) but last by crowding (4/5).
    s = moasha(reduction_factor=2, tie_break=tie_break)
    for key, values in [("a", (1.0, 10.0)), ("b", (0.9, 8.5)), ("d", (0.0, 0.0)), ("e", (0.45, 4.0))]:
        s.decide(key, 1, values)
    assert s.decide("c", 1, (0.5, 4.5)) is keep


def test_replay_returns_the_recorded_decision_and_counts_once():
    s = moasha()
    s.decide("a", 1, [0.8, 5.0])
    assert s.decide("b", 1, [0.7, 6.0]) is False
    before = s.counts()
    # A re-run after a crash (its values may differ a little): same answer, nothing counted again.
    assert s.decide("b", 1, [0.99, 1.0]) is False
    assert s.decide("a", 1, [0.1, 50.0]) is True
    assert s.counts() == before
    assert len(s.decisions) == 2


def drive(s, trials):
    return [s.decide(key, epoch, values) for key, epoch, values in trials]


FIRST = [(f"k{i}", 1, (0.1 * (i % 7), float((3 * i) % 5))) for i in range(8)] + [
    ("k0", 3, (0.5, 2.0)), ("k3", 3, (0.4, 1.0)), ("k5", 3, (math.nan, 1.0)),
]
LATER = [(f"n{i}", 1, (0.05 * i, float(i % 4))) for i in range(6)] + [
    ("k6", 3, (0.6, 2.5)), ("n2", 3, (0.7, 0.5)), ("k0", 1, (0.0, 9.0)), ("k3", 3, (1.0, 0.0)),
]


@pytest.mark.parametrize("tie_break", ["eps_net", "crowding"])
def test_restore_gives_the_same_later_decisions(tie_break):
    a = moasha(rungs=[1, 3], tie_break=tie_break)
    first = drive(a, FIRST)
    records = json.loads(json.dumps([d.to_record() for d in a.decisions]))  # as rungs.jsonl holds them
    b = moasha(rungs=[1, 3], tie_break=tie_break)
    b.restore(records)
    assert b.counts() == a.counts()
    assert drive(b, FIRST) == first  # replays
    assert b.counts() == a.counts()
    assert drive(b, LATER) == drive(a, LATER)
    assert json.dumps([d.to_record() for d in b.decisions]) == json.dumps([d.to_record() for d in a.decisions])
    assert b.counts() == a.counts()


def test_restore_takes_records_as_recorded_and_replaces_the_state():
    s = moasha()
    s.decide("old", 1, [0.9, 1.0])
    # Recorded keep=True for a trial that would now stop, and a duplicate record (first one wins).
    s.restore([
        {"key": "a", "epoch": 1, "values": [0.8, 5.0], "keep": True},
        {"key": "b", "epoch": 1, "values": [0.7, 6.0], "keep": True},
        {"key": "b", "epoch": 1, "values": [0.7, 6.0], "keep": False},
    ])
    assert s.counts() == {1: {"judged": 2, "stopped": 0}}
    assert s.decide("b", 1, [0.7, 6.0]) is True
    assert s.decide("old", 1, [0.9, 1.0]) is True  # judged anew: the old state is gone
    assert s.counts() == {1: {"judged": 3, "stopped": 0}}


@pytest.mark.parametrize(
    "record",
    [
        {"key": "a", "epoch": 1, "values": [0.8, 5.0]},
        {"key": "a", "epoch": 1, "values": [0.8, 5.0], "keep": "yes"},
        {"key": "a", "epoch": 1, "values": "x", "keep": True},
    ],
)
def test_restore_refuses_a_bad_record(record):
    with pytest.raises(ValueError, match="scheduler record"):
        moasha().restore([record])


def test_decision_record_round_trip():
    d = Decision("a", 3, (0.5, 2.0), False)
    assert d.to_record() == {"key": "a", "epoch": 3, "values": [0.5, 2.0], "keep": False}
    assert Decision.from_record(d.to_record()) == d


def test_two_rungs():
    s = moasha(rungs=[1, 3])
    assert s.rungs == (1, 3)
    assert s.decide("a", 1, [0.5, 5.0]) is True
    assert s.decide("b", 1, [0.9, 1.0]) is True
    assert s.decide("a", 3, [0.6, 5.0]) is True  # first at rung 3, whatever happened at rung 1
    assert s.decide("b", 3, [0.4, 6.0]) is False  # judged only against rung 3's trials: 1/2
    assert s.counts() == {1: {"judged": 2, "stopped": 0}, 3: {"judged": 2, "stopped": 1}}
    with pytest.raises(ValueError, match="not a rung"):
        s.decide("a", 2, [0.5, 5.0])
    with pytest.raises(ValueError, match="one per objective"):
        s.decide("c", 1, [0.5])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_value_that_cannot_be_ranked_stops_and_counts(bad):
    s = moasha()
    assert s.decide("x", 1, [bad, 1.0]) is False
    assert s.counts() == {1: {"judged": 1, "stopped": 1}}
    # It ranks behind every finite trial (an inf accuracy does not dominate), yet counts in n.
    assert s.decide("a", 1, [0.5, 2.0]) is True  # 0/2
    assert s.decide("c", 1, [0.3, 4.0]) is False  # behind a: 1/3, at the boundary, not < 1/3
    assert s.decide("b", 1, [0.4, 3.0]) is True  # behind a, ahead of c and x: 1/4, kept only because x counts (1/3)
    assert s.counts() == {1: {"judged": 4, "stopped": 2}}


# Distinct values of one maximised objective, in the order they reach the rung.
ARRIVALS = {
    "worst_first": [0.1 * k for k in range(1, 10)],  # each the best so far: every one goes on
    "best_first": [0.1 * k for k in range(9, 0, -1)],  # each the worst so far: only the first goes on
    "shuffled": [0.5, 0.8, 0.2, 0.9, 0.1, 0.6, 0.4, 0.7, 0.3],  # 0.6: 2/6 (rf 3 edge); 0.7: 2/8 (rf 4 edge)
}


def ray_asha_keeps(values_so_far, rf):
    """Ray Tune's ASHA rule (AsyncHyperBandScheduler, `_Bracket.cutoff`): go on iff value >= the (1 - 1/rf)
    quantile. Here the quantile is taken over the rung's values including the arriving one; Ray's on_result takes
    it before recording that value, and its interpolation then keeps e.g. the shuffled 0.7 at rf 4 (2/8, the
    boundary). With the arriving value counted, and rf an integer, this is exactly position * rf < n."""
    value = values_so_far[-1]
    return bool(value >= np.nanpercentile(values_so_far, (1 - 1 / rf) * 100))


@pytest.mark.parametrize("rf", [3, 4])
def test_keeps_what_ray_asha_keeps_on_one_objective(rf):
    # One objective (directions ("max",) is allowed): every front is one trial, the order is the value's.
    for name, values in ARRIVALS.items():
        s = moasha(reduction_factor=rf, directions=("max",))
        got = [s.decide(f"t{i}", 1, [v]) for i, v in enumerate(values)]
        assert got == [ray_asha_keeps(values[: i + 1], rf) for i in range(len(values))], name
    # Every (position, n) for n = 1..9: n - 1 trials at 1..n-1, then one with exactly `position` values above it.
    for n in range(1, 10):
        for position in range(n):
            s = moasha(reduction_factor=rf, directions=("max",))
            earlier = [float(k) for k in range(1, n)]
            for i, v in enumerate(earlier):
                s.decide(f"e{i}", 1, [v])
            value = n - 1 - position + 0.5
            keep = s.decide("x", 1, [value])
            assert keep is ray_asha_keeps([*earlier, value], rf), (n, position)
            assert keep is (position < math.ceil(n / rf)), (n, position)  # the top ceil(n / rf) go on


def test_rungs_may_be_a_list_config():
    assert moasha(rungs=OmegaConf.create([1, 2, 5])).rungs == (1, 2, 5)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rungs": []}, "scheduler.rungs"),
        ({"rungs": [0, 2]}, "scheduler.rungs"),
        ({"rungs": [3, 1]}, "scheduler.rungs"),
        ({"rungs": [1, 1]}, "scheduler.rungs"),
        ({"rungs": [True, 2]}, "scheduler.rungs"),
        ({"rungs": [1.5]}, "scheduler.rungs"),
        ({"rungs": "12"}, "scheduler.rungs"),
        ({"rungs": 3}, "scheduler.rungs"),
        ({"reduction_factor": 1}, "scheduler.reduction_factor"),
        ({"reduction_factor": 0.5}, "scheduler.reduction_factor"),
        ({"reduction_factor": True}, "scheduler.reduction_factor"),
        ({"reduction_factor": "3"}, "scheduler.reduction_factor"),
        ({"reduction_factor": math.inf}, "scheduler.reduction_factor"),
        ({"reduction_factor": math.nan}, "scheduler.reduction_factor"),
        ({"tie_break": "random"}, "scheduler.tie_break"),
        ({"latency_first": "yes"}, "scheduler.latency_first"),
        ({"latency_first": 1}, "scheduler.latency_first"),
        ({"directions": []}, "scheduler.directions"),
        ({"directions": ["max", "up"]}, "scheduler.directions"),
    ],
)
def test_each_bad_setting_is_named(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        moasha(**kwargs)
    assert "\n" not in str(e.value) and "allowed:" in str(e.value)


def test_good_settings_are_kept():
    s = moasha(rungs=[1, 4], reduction_factor=2.5, tie_break="crowding", latency_first=False)
    assert (s.rungs, s.reduction_factor, s.tie_break, s.latency_first) == ((1, 4), 2.5, "crowding", False)
    assert s.directions == ACC_LAT


# ----------------------------------------------------------------------------- full training


def test_full_training_never_judges():
    f = FullTraining(latency_first=False, directions=ACC_LAT)
    assert f.rungs == () and f.latency_first is False
    assert f.counts() == {}
    f.restore([{"key": "a", "epoch": 1, "values": [0.5, 1.0], "keep": False}])
    assert f.counts() == {} and f.decisions == ()
    with pytest.raises(RuntimeError, match="no rungs"):
        f.decide("a", 1, [0.5, 1.0])


@pytest.mark.parametrize(("kwargs", "key"), [({"latency_first": "no"}, "latency_first"), ({"directions": ["up"]}, "directions")])
def test_full_training_bad_settings(kwargs, key):
    with pytest.raises(ValueError, match=rf"scheduler\.{key}"):
        FullTraining(**kwargs)
