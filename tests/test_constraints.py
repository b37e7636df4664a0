"""Budgets reach the samplers as Optuna constraints, and every sampler of hwnas' own ranks by them."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import optuna
import pytest

from hwnas.evaluators.base import Evaluation
from hwnas.search.broker import Broker
from hwnas.search.constraints import violation
from hwnas.search.objectives import MISSING_VIOLATION, Objectives
from hwnas.search.runners.local_runner import run_in_process
from hwnas.search.samplers import RegularizedEvolutionSampler, RLControllerSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)
BUDGET = Objectives(("acc", "lat"), ("max", "min"), {"lat": ("upper", 2.0), "acc": ("lower", 0.5)})


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_constraint_values_follow_optunas_sign_and_agree_with_feasibility() -> None:
    assert BUDGET.constraints({"acc": 0.7, "lat": 1.5}) == {"lat": -0.5, "acc": pytest.approx(-0.2)}
    assert BUDGET.constraints({"acc": 0.4, "lat": 2.5}) == {"lat": 0.5, "acc": pytest.approx(0.1)}
    assert BUDGET.constraints({"acc": 0.7}) == {"lat": MISSING_VIOLATION, "acc": pytest.approx(-0.2)}
    assert Objectives(("acc",), ("max",)).constraints({"acc": 1.0}) is None
    for metrics, feasible in (({"acc": 0.7, "lat": 2.0}, True), ({"acc": 0.7, "lat": 2.01}, False), ({"lat": 1.0}, False)):
        assert BUDGET.is_feasible(metrics) is feasible
        assert all(c <= 0 for c in BUDGET.constraints(metrics).values()) is feasible


def test_runner_tells_constraints_with_values_also_for_repeats() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))

    class Space:
        def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
            return {"x": trial.suggest_categorical("x", [0, 1, 2, 3])}

    def evaluate(number: int, candidate: dict[str, Any]) -> Evaluation:
        return Evaluation({"acc": 0.6 + 0.1 * candidate["x"], "lat": float(candidate["x"])})

    assert run_in_process(Broker(study, Space(), BUDGET, 4), evaluate) == 4  # type: ignore[arg-type]
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) > 4  # four distinct candidates took more asks: repeats were answered from the record
    for t in trials:
        assert t.constraints == {"lat": t.params["x"] - 2.0, "acc": pytest.approx(0.5 - 0.6 - 0.1 * t.params["x"])}
        assert (violation(t) > 0) == (t.params["x"] == 3)


def _trial(values: list[float], over: float, x: int) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(
        params={"x": x}, distributions={"x": optuna.distributions.CategoricalDistribution(list(range(8)))}, values=values,
    )
    trial.set_constraint("budget", over)
    return trial


def test_evolution_ranks_every_trial_within_budget_above_those_over_it() -> None:
    sampler = RegularizedEvolutionSampler(population_size=6, sample_size=6, seed=0)
    directions = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    population = [
        _trial([0.9, 1.0], 0.5, 0),   # dominates everything, but over budget
        _trial([0.8, 1.0], 2.0, 1),   # over budget by more
        _trial([0.5, 3.0], 0.0, 2),   # within budget (0 counts as met)
        _trial([0.6, 3.0], -1.0, 3),  # within budget, dominates the one above
        _trial([0.4, 2.0], -1.0, 4),  # within budget, on the within-budget front
        _trial([0.3, 4.0], -1.0, 5),  # within budget, dominated
    ]
    keys = sampler._fitness_keys(directions, population)
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    ranked = [population[i].params["x"] for i in order]
    assert set(ranked[:2]) == {3, 4} and ranked[2:4] == [2, 5] and ranked[4:] == [0, 1]
    # A full tournament (sample_size = population) always picks a front member within budget.
    assert {population[sampler._tournament(keys)].params["x"] for _ in range(20)} <= {3, 4}


@pytest.mark.parametrize(("budgeted", "favourite"), [(True, 2), (False, 3)])
def test_rl_learns_to_stay_within_budget(budgeted: bool, favourite: int) -> None:
    sampler = RLControllerSampler(seed=0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(120):
        trial = study.ask()
        x = trial.suggest_categorical("x0", [0, 1, 2, 3])
        # Accuracy grows with x, latency is flat; x = 3 is the best, and over budget when there is one.
        if budgeted:
            trial.set_constraint("lat", 1.0 if x == 3 else -1.0)
        study.tell(trial, [x / 3, 0.5])
    _, _, logits = sampler._decisions["x0"]
    assert int(np.argmax(logits)) == favourite


def test_resume_tells_a_recorded_trial_its_constraints_too() -> None:
    from hwnas.search.study_record import reconcile_study

    study = optuna.create_study(directions=["maximize", "minimize"])
    done, lost = study.ask(), study.ask()  # both RUNNING when the driver died
    for t in (done, lost):
        t.suggest_categorical("x", [0, 1])
    rows = [{"number": done.number, "status": "COMPLETE", "metrics": {"acc": 0.7, "lat": 2.5}}]
    retried = reconcile_study(study, rows, BUDGET)
    finished = study.trials[done.number]
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.values == [0.7, 2.5]
    assert finished.constraints == {"lat": 0.5, "acc": pytest.approx(-0.2)}
    assert study.trials[lost.number].state == optuna.trial.TrialState.FAIL and len(retried) == 1
