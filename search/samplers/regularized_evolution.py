"""Regularized (aging) evolution (Real et al. 2019) as an Optuna sampler.

Until `population_size` trials have completed, proposals are uniform random. After that the
population is the `population_size` most recently completed trials (older ones age out however
good they were); a tournament samples `sample_size` of them and the best becomes the parent; the
child is the parent with exactly one parameter resampled to a different value. Multi-objective
studies rank the population by non-dominated sorting, ties broken by crowding distance, then at
random. With budgets (Optuna trial constraints), trials within budget beat those over it, and
those over it rank by how far they miss (Deb's constrained domination).

The whole child is proposed through `sample_relative`; a parameter the parent doesn't have
(a branch the mutation switched on, e.g. `stage4.*` after `n_stages` 3 -> 4) is drawn uniformly in
`sample_independent`, and parent values of branches switched off are simply not asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hwnas.search.constraints import violation
from hwnas.search.pareto import crowding_distance, non_dominated_ranks
from hwnas.search.samplers._discretize import TrialIndex, sample_other, sample_uniform


class RegularizedEvolutionSampler(BaseSampler):
    """Aging evolution with one-parameter mutations and (Pareto-rank) tournaments.

    Args:
        population_size: trials in the population; also the number of random trials first.
        sample_size: tournament size (1 = random parent, population_size = always the best).
        seed: seed of the sampler's own RNG.
        max_retries: tournaments + mutations tried to find a child not already in the study (then
            as many uniform draws), before giving up and proposing a repeat.
    """

    def __init__(
        self,
        *,
        population_size: int = 20,
        sample_size: int = 5,
        seed: int | None = None,
        max_retries: int = 32,
    ) -> None:
        if not isinstance(population_size, int) or isinstance(population_size, bool) or population_size < 2:
            raise ValueError(f"population_size {population_size!r} is not allowed; allowed: an int >= 2")
        if (
            not isinstance(sample_size, int)
            or isinstance(sample_size, bool)
            or not 1 <= sample_size <= population_size
        ):
            raise ValueError(
                f"sample_size {sample_size!r} is not allowed; allowed: an int in [1, population_size={population_size}]"
            )
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"max_retries {max_retries!r} is not allowed; allowed: an int >= 0")
        self._population_size = population_size
        self._sample_size = sample_size
        self._max_retries = max_retries
        self._rng = np.random.default_rng(seed)
        self._index = TrialIndex()

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._index.refresh(study, trial.number)
        return dict(self._index.distributions)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        population = self._population(study)
        if len(population) == self._population_size:
            keys = self._fitness_keys(study.directions, population)
            for _ in range(self._max_retries):
                child = self._mutate(population[self._tournament(keys)])
                if not self._index.contains(child):
                    return child
        # Random phase, or every mutation tried had been evaluated already.
        names = sorted(search_space)
        for _ in range(1 + self._max_retries):
            params = {n: sample_uniform(search_space[n], self._rng) for n in names}
            if not self._index.contains(params):
                return params
        return params

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return sample_uniform(param_distribution, self._rng)

    # ------------------------------------------------------------------ evolution

    def _population(self, study: Study) -> list[FrozenTrial]:
        done = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
        done = sorted(done, key=lambda t: (t.datetime_complete, t.number))  # aging: completion order
        return done[-self._population_size :]

    def _fitness_keys(self, directions: list[StudyDirection], population: list[FrozenTrial]) -> np.ndarray:
        """(n, 3) sort keys, smaller is fitter: over budget (0/1), then the value or Pareto rank of a
        trial within budget (how far over budget for one that is not), then minus its crowding distance.

        Deb's constrained domination: any trial within budget beats any trial over it.
        """
        sign = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions])
        q = np.array([t.values for t in population], dtype=float) * sign
        over = np.array([violation(t) for t in population])
        ok = over <= 0
        keys = np.zeros((len(q), 3))
        keys[:, 0] = ~ok
        keys[~ok, 1] = over[~ok]
        if q.shape[1] == 1:
            keys[ok, 1] = q[ok, 0]
        elif ok.any():
            members = np.flatnonzero(ok)
            ranks = non_dominated_ranks(q[members], ["min"] * q.shape[1]).astype(float)
            keys[members, 1] = ranks
            for rank in np.unique(ranks):
                front = members[ranks == rank]
                keys[front, 2] = -crowding_distance(q[front])
        return keys

    def _tournament(self, keys: np.ndarray) -> int:
        contestants = self._rng.choice(len(keys), size=self._sample_size, replace=False)
        # lexsort is stable and the contestants come in random order, so exact ties go at random.
        k = keys[contestants]
        best = np.lexsort((k[:, 2], k[:, 1], k[:, 0]))[0]
        return int(contestants[best])

    def _mutate(self, parent: FrozenTrial) -> dict[str, Any]:
        child = dict(parent.params)
        mutable = sorted(n for n, d in parent.distributions.items() if not d.single())
        if mutable:
            name = mutable[int(self._rng.integers(len(mutable)))]
            child[name] = sample_other(parent.distributions[name], child[name], self._rng)
        return child
