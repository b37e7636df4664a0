"""The contract every search strategy in conf/search/ keeps, whatever its algorithm.

Each sampler is built from its yaml exactly as a run builds it (Hydra `instantiate` with the root
`seed`) and driven through Optuna's ask/tell interface, the one Ray Tune's OptunaSearch uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import optuna
import pytest
from omegaconf import OmegaConf

from hwnas.search.samplers import RegularizedEvolutionSampler, RLControllerSampler
from hwnas.spaces.candidate import canonical

CONF = Path(__file__).resolve().parent.parent / "conf" / "search"
SAMPLERS = sorted(p.stem for p in CONF.glob("*.yaml"))
OURS = ("evolution", "rl")
# GP fits take ~0.2 s (single) to seconds (multi-objective) per trial: start fitting early, run few.
FAST_GP = {"n_startup_trials": 3}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def build(name: str, seed: int = 0, **overrides: Any) -> optuna.samplers.BaseSampler:
    node = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), FAST_GP if name == "gp" else {}, overrides)
    cfg = OmegaConf.create({"seed": seed, "search": node})
    return hydra.utils.instantiate(cfg.search)


def n_trials(name: str, n: int) -> int:
    return min(n, 4) if name == "gp" else n


# ----------------------------------------------------------------------------- spaces and objectives


def mixed_space(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """Every distribution type, with a conditional branch (stage4.* only when n_stages == 4)."""
    n_stages = trial.suggest_categorical("n_stages", [3, 4])
    for s in range(1, n_stages + 1):
        trial.suggest_categorical(f"stage{s}.op", ["conv", "dw", "skip"])
    trial.suggest_int("width", 8, 64, step=8)
    trial.suggest_int("channels", 4, 256, log=True)
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_float("wd", 0.0, 0.1, step=0.01)
    return dict(trial.params)


def mixed_values(params: dict[str, Any]) -> list[float]:
    ops = sum(params[k] == "conv" for k in params if k.endswith(".op"))
    accuracy = (
        0.1 * ops + params["width"] / 640 + params["dropout"] / 10 - abs(np.log10(params["lr"]) + 2) / 10
    )
    latency = params["n_stages"] + params["channels"] / 64 + params["wd"]
    return [float(accuracy), float(latency)]


def grid_space(n_decisions: int, n_choices: int) -> Callable[[optuna.trial.BaseTrial], dict[str, Any]]:
    def suggest(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        for k in range(n_decisions):
            trial.suggest_categorical(f"x{k}", list(range(n_choices)))
        return dict(trial.params)

    return suggest


def make_study(name: str, n_objectives: int, seed: int = 0, **overrides: Any) -> optuna.Study:
    directions = ["maximize", "minimize"][:n_objectives]
    return optuna.create_study(directions=directions, sampler=build(name, seed, **overrides))


def drive(
    study: optuna.Study,
    n: int,
    space: Callable[[optuna.trial.BaseTrial], dict[str, Any]] = mixed_space,
    values: Callable[[dict[str, Any]], list[float]] = mixed_values,
    batch: int = 1,
) -> list[dict[str, Any]]:
    """Ask `batch` trials, suggest each, then tell them all; repeat until n trials. Returns the params."""
    asked: list[dict[str, Any]] = []
    n_objectives = len(study.directions)
    while len(asked) < n:
        trials = [study.ask() for _ in range(min(batch, n - len(asked)))]
        params = [space(t) for t in trials]
        for trial, p in zip(trials, params, strict=True):
            study.tell(trial, values(p)[:n_objectives])
        asked.extend(params)
    return asked


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    # GP and group-TPE announce experimental/independent sampling; not what these tests are about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- contract


def test_every_yaml_is_covered() -> None:
    assert SAMPLERS == ["evolution", "gp", "nsga2", "random", "rl", "tpe"]


@pytest.mark.parametrize("n_objectives", [1, 2])
@pytest.mark.parametrize("name", SAMPLERS)
def test_suggests_only_valid_values(name: str, n_objectives: int) -> None:
    study = make_study(name, n_objectives)
    drive(study, n_trials(name, 30))
    assert len(study.trials) == n_trials(name, 30)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert ("stage4.op" in t.params) == (t.params["n_stages"] == 4)
        for key, value in t.params.items():
            dist = t.distributions[key]
            assert dist._contains(dist.to_internal_repr(value)), (name, key, value)
    if name != "gp":  # every branch gets explored in 30 trials
        assert {t.params["n_stages"] for t in study.trials} == {3, 4}


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_sequence(name: str) -> None:
    n = n_trials(name, 30)
    first = drive(make_study(name, 2 if name != "gp" else 1, seed=7), n)
    again = drive(make_study(name, 2 if name != "gp" else 1, seed=7), n)
    other = drive(make_study(name, 2 if name != "gp" else 1, seed=8), n)
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", SAMPLERS)
def test_parallel_trials_asked_before_any_tell(name: str) -> None:
    study = make_study(name, 2 if name != "gp" else 1)
    drive(study, n_trials(name, 24), batch=4)
    assert len(study.trials) == n_trials(name, 24)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if name in OURS:  # the four of a batch see each other as RUNNING and never coincide
        keys = [canonical(t.params) for t in study.trials]
        assert len(set(keys)) == len(keys)
        tiny = drive(make_study(name, 1), 8, grid_space(3, 2), lambda p: [float(sum(p.values()))], batch=4)
        assert len({canonical(p) for p in tiny}) == 8


@pytest.mark.parametrize("name", SAMPLERS)
def test_state_survives_a_restart(name: str, tmp_path: Path) -> None:
    # hwnas never pickles a study or its sampler (Optuna 5.1's genetic samplers hold a thread lock and
    # cannot be pickled): the sweep's state is Optuna's journal in run_dir, and a restarted driver
    # loads it with a sampler built afresh from the config (search/runners/sweep.py).
    from hwnas.search.sweep_state import journal_storage

    n_objectives = 2 if name != "gp" else 1
    directions = ["maximize", "minimize"][:n_objectives]
    first = optuna.create_study(
        directions=directions, sampler=build(name), storage=journal_storage(tmp_path), study_name="s"
    )
    before = drive(first, n_trials(name, 20) - 2)
    again = optuna.load_study(study_name="s", storage=journal_storage(tmp_path), sampler=build(name))
    assert [t.params for t in again.trials] == before
    after = drive(again, 2 if name == "gp" else 12)
    trials = again.trials
    assert len(trials) == len(before) + len(after)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials[len(before):]:
        for key, value in t.params.items():
            assert t.distributions[key]._contains(t.distributions[key].to_internal_repr(value)), (name, key)
    if name == "nsga2":  # the generation count continues from the journal (population 10: 18 + 12 trials)
        generations = [t.system_attrs.get("NSGAIISampler:generation") for t in trials]
        assert max(g for g in generations if g is not None) >= 2


@pytest.mark.parametrize("name", [*OURS, "random"])
def test_no_repeat_at_small_budget(name: str) -> None:
    # 5^6 = 15,625 candidates, 40 trials: no repeat needed. Random holds it by luck (~95% of seeds);
    # NSGA-II does repeat here (crossover of two parents can copy one), TPE does later on.
    study = make_study(name, 2)
    space = grid_space(6, 5)
    params = drive(study, n_trials(name, 40), space, lambda p: [sum(p.values()), max(p.values())])
    keys = [canonical(p) for p in params]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", OURS)
def test_never_repeats_until_the_space_is_exhausted(name: str) -> None:
    # 3^4 = 81 candidates and 70 trials: a naive sampler repeats ~20 times (random does, see below).
    space = grid_space(4, 3)
    values = lambda p: [float(sum(v == 1 for v in p.values())), float(sum(p.values()))]  # noqa: E731
    keys = [canonical(p) for p in drive(make_study(name, 2), 70, space, values)]
    assert len(set(keys)) == 70
    baseline = [canonical(p) for p in drive(make_study("random", 2), 70, space, values)]
    assert len(set(baseline)) < 70
    # Exhausted: 2^2 = 4 candidates, 6 trials -> the first 4 are all of them, then repeats are fine.
    tiny = [
        canonical(p)
        for p in drive(make_study(name, 1), 6, grid_space(2, 2), lambda p: [float(sum(p.values()))])
    ]
    assert len(set(tiny[:4])) == 4


@pytest.mark.parametrize("name", OURS)
def test_learns_the_best_choice_on_a_toy_problem(name: str) -> None:
    # 6 decisions of 5 choices; choice 2 is best for both accuracy (max) and latency (min).
    rng = np.random.default_rng(0)

    def values(p: dict[str, Any]) -> list[float]:
        good = sum(v == 2 for v in p.values())
        return [good / 6 + rng.normal(0, 0.05), 1 + 0.5 * (6 - good) + rng.normal(0, 0.05)]

    def hit_rate(sampler: str, seed: int) -> float:
        params = drive(make_study(sampler, 2, seed=seed), 150, grid_space(6, 5), values)
        return float(np.mean([[v == 2 for v in p.values()] for p in params[-50:]]))

    learned = np.mean([hit_rate(name, seed) for seed in (0, 1)])
    random = np.mean([hit_rate("random", seed) for seed in (0, 1)])
    assert random < 0.3  # 1 in 5 by chance
    assert learned > random + 0.25


# ----------------------------------------------------------------------------- our samplers in detail


def test_evolution_children_differ_from_a_population_member_in_one_decision() -> None:
    study = make_study("evolution", 2)
    params = drive(study, 80, grid_space(6, 5), lambda p: [float(p["x0"] + p["x1"]), float(p["x2"])])
    population_size = 20
    one_step = 0
    for i in range(population_size, len(params)):
        distances = [sum(params[i][k] != q[k] for k in q) for q in params[:i]]
        one_step += min(distances) == 1
    assert one_step == len(params) - population_size


def test_evolution_turns_on_conditional_branches() -> None:
    # The parent may lack stage4.*: a mutation to n_stages=4 must still produce valid stage4 values.
    study = make_study("evolution", 1, population_size=4, sample_size=2)
    drive(study, 60)
    grown = [t for t in study.trials[4:] if t.params["n_stages"] == 4]
    assert grown and all(t.params["stage4.op"] in ("conv", "dw", "skip") for t in grown)


def test_rl_policy_concentrates_on_the_rewarded_choice() -> None:
    sampler = RLControllerSampler(seed=0, reward="mnas", target=1.0, alpha=0.0, beta=-1.0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    drive(study, 80, grid_space(1, 4), lambda p: [1.0 if p["x0"] == 3 else 0.5, 0.5])
    _, _, logits = sampler._decisions["x0"]
    assert int(np.argmax(logits)) == 3


@pytest.mark.parametrize(
    ("latency", "expected"),
    [(0.5, 0.8), (1.0, 0.8), (2.0, 0.4)],  # hard constraint: full reward at or under T, ACC * T/LAT over
)
def test_mnas_reward_hard_constraint(latency: float, expected: float) -> None:
    sampler = RLControllerSampler(reward="mnas", target=1.0, alpha=0.0, beta=-1.0)
    assert sampler._mnas_reward([0.8, latency]) == pytest.approx(expected)


def test_mnas_reward_soft_constraint() -> None:
    sampler = RLControllerSampler(reward="mnas", target=2.0, alpha=-0.07, beta=-0.07)
    assert sampler._mnas_reward([0.9, 4.0]) == pytest.approx(0.9 * 2.0**-0.07)
    assert sampler._mnas_reward([0.9, 1.0]) == pytest.approx(0.9 * 0.5**-0.07)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"reward": "accuracy"}, "reward 'accuracy'"),
        ({"learning_rate": 0.0}, "learning_rate 0.0"),
        ({"baseline_decay": 1.0}, "baseline_decay 1.0"),
        ({"target": -1.0}, "target -1.0"),
        ({"accuracy_index": 1, "latency_index": 1}, "latency_index 1"),
        ({"n_bins": 1}, "n_bins 1"),
        ({"clip_ratio": 0.0}, "clip_ratio 0.0"),
    ],
)
def test_rl_rejects_bad_arguments(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RLControllerSampler(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"population_size": 1}, "population_size 1"),
        ({"population_size": 10, "sample_size": 11}, "sample_size 11"),
        ({"sample_size": 0}, "sample_size 0"),
        ({"max_retries": -1}, "max_retries -1"),
    ],
)
def test_evolution_rejects_bad_arguments(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RegularizedEvolutionSampler(**kwargs)


def test_rl_grids_respect_step_log_and_bin_caps() -> None:
    from optuna.distributions import FloatDistribution, IntDistribution

    from hwnas.search.samplers._discretize import grid

    assert grid(IntDistribution(8, 64, step=8), n_bins=4, max_int_bins=32) == [8, 16, 24, 32, 40, 48, 56, 64]
    wide = grid(IntDistribution(1, 10_000, log=True), n_bins=4, max_int_bins=32)
    assert wide[0] == 1 and wide[-1] == 10_000 and len(wide) <= 32
    assert wide[3] - wide[2] < wide[-1] - wide[-2]  # log-spaced: dense at the low end
    assert grid(FloatDistribution(0.0, 0.1, step=0.05), n_bins=8, max_int_bins=32) == [0.0, 0.05, 0.1]
    assert grid(FloatDistribution(1e-4, 1e-1, log=True), n_bins=4, max_int_bins=32) == pytest.approx(
        [1e-4, 1e-3, 1e-2, 1e-1]
    )
