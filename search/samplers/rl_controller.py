"""Policy-gradient controller (NASNet / ENAS / MnasNet style) as an Optuna sampler.

The policy is factorised: one logits vector per parameter name, created the first time the name
is seen, over a finite grid of that parameter's values (`_discretize.grid`). Proposals are drawn
from the policy; learning is REINFORCE with a moving-average baseline, the advantage scaled by a
moving standard deviation (so one learning rate works whatever the reward's units), PPO-style
ratio clipping for trials sampled by an older policy, and an entropy bonus. Only COMPLETE trials
are learned from, each exactly once, in trial-number order, when the next trial is asked: so
trials running in parallel (runner=ray) are fine, each update uses finished ones.
A trial over budget (Optuna trial constraints) gets the worst reward seen within budget.

All state (policy, baseline, RNG, learned-trial set) lives in plain attributes, so
`pickle.loads(pickle.dumps(sampler))` continues exactly where the original would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hwnas.search.constraints import violation
from hwnas.search.pareto import hypervolume, non_dominated_mask
from hwnas.search.samplers._discretize import TrialIndex, grid, nearest_index, sample_other

REWARDS = ("mnas", "hypervolume")
# Reference point of the normalised hypervolume: 10% beyond the worst value seen on each objective,
# so the extreme points of the front still add volume.
_HV_REFERENCE = 1.1


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


class RLControllerSampler(BaseSampler):
    """REINFORCE controller over a define-by-run space.

    Args:
        seed: seed of the sampler's own RNG.
        reward: 'mnas' (MnasNet: ACC * (LAT / target) ** w, w = alpha if LAT <= target else beta;
            soft constraint alpha = beta = -0.07, hard constraint alpha = 0, beta = -1) or
            'hypervolume' (objectives scaled to [0, 1] over the trials learned so far, reference
            point 1.1: the hypervolume of the trial's own box plus the hypervolume it adds to the
            front of the learned trials). Single-objective studies use the
            objective value itself (negated when minimised) for either.
        accuracy_index, latency_index: positions of ACC and LAT in the trial's values ('mnas').
        target: latency target T of 'mnas', in the latency objective's units.
        alpha, beta: the exponent w of 'mnas' at or under, and over, the target.
        learning_rate: step size on the logits.
        entropy_weight: weight of the entropy bonus (keeps the policy exploring).
        baseline_decay: decay of the moving average (and moving variance) of the reward.
        clip_ratio: PPO clip epsilon on the probability ratio new/behaviour policy; None: plain REINFORCE.
        n_bins: grid size of float parameters (log-spaced when log=True).
        max_int_bins: the most grid points of an int parameter (evenly or log-spaced beyond it).
        max_retries: policy draws spent avoiding a parameter set already in the study, then as
            many policy draws with more and more decisions redrawn at random, before giving up
            and proposing a repeat.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        reward: str = "hypervolume",
        accuracy_index: int = 0,
        latency_index: int = 1,
        target: float = 1.0,
        alpha: float = -0.07,
        beta: float = -0.07,
        learning_rate: float = 0.2,
        entropy_weight: float = 0.01,
        baseline_decay: float = 0.9,
        clip_ratio: float | None = 0.2,
        n_bins: int = 8,
        max_int_bins: int = 32,
        max_retries: int = 32,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"reward {reward!r} is not allowed; allowed: {', '.join(REWARDS)}")
        for name, index in (("accuracy_index", accuracy_index), ("latency_index", latency_index)):
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"{name} {index!r} is not allowed; allowed: an int >= 0")
        if accuracy_index == latency_index:
            raise ValueError(
                f"latency_index {latency_index!r} equals accuracy_index; allowed: two different objectives"
            )
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target {target!r} is not allowed; allowed: a finite number > 0")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not math.isfinite(value):
                raise ValueError(f"{name} {value!r} is not allowed; allowed: a finite number")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate {learning_rate!r} is not allowed; allowed: a finite number > 0")
        if not (math.isfinite(entropy_weight) and entropy_weight >= 0):
            raise ValueError(
                f"entropy_weight {entropy_weight!r} is not allowed; allowed: a finite number >= 0"
            )
        if not 0 <= baseline_decay < 1:
            raise ValueError(f"baseline_decay {baseline_decay!r} is not allowed; allowed: 0 <= decay < 1")
        if clip_ratio is not None and not (math.isfinite(clip_ratio) and clip_ratio > 0):
            raise ValueError(
                f"clip_ratio {clip_ratio!r} is not allowed; allowed: a finite number > 0, or None"
            )
        for name, value, low in (
            ("n_bins", n_bins, 2),
            ("max_int_bins", max_int_bins, 2),
            ("max_retries", max_retries, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} {value!r} is not allowed; allowed: an int >= {low}")
        self._reward_kind = reward
        self._accuracy_index = accuracy_index
        self._latency_index = latency_index
        self._target = float(target)
        self._alpha = float(alpha)
        self._beta = float(beta)
        self._lr = float(learning_rate)
        self._entropy_weight = float(entropy_weight)
        self._decay = float(baseline_decay)
        self._clip = None if clip_ratio is None else float(clip_ratio)
        self._n_bins = n_bins
        self._max_int_bins = max_int_bins
        self._max_retries = max_retries

        self._rng = np.random.default_rng(seed)
        self._index = TrialIndex()
        # name -> (distribution, grid values, logits); a changed distribution starts a fresh decision.
        self._decisions: dict[str, tuple[BaseDistribution, list[Any], np.ndarray]] = {}
        self._baseline: float | None = None
        self._worst: float | None = None  # lowest reward of a trial within budget: what one over budget gets
        self._variance = 0.0
        self._learned: set[int] = set()
        # trial number -> name -> (grid index, log-prob) when the policy proposed it, for the PPO ratio.
        self._behaviour: dict[int, dict[str, tuple[int, float]]] = {}
        # Hypervolume reward: front and bounds of the learned trials, in minimisation form.
        self._front: np.ndarray | None = None
        self._low: np.ndarray | None = None
        self._high: np.ndarray | None = None

    # ------------------------------------------------------------------ Optuna sampler interface

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._learn(study)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._index.refresh(study, trial.number)
        return dict(self._index.distributions)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        names = sorted(search_space)
        for _ in range(1 + self._max_retries):
            params, behaviour = self._draw(names, search_space)
            if not self._index.contains(params):
                self._behaviour[trial.number] = behaviour
                return params
        # The policy keeps proposing evaluated sets (it has converged): propose its nearest
        # unevaluated neighbours instead, a policy draw with 1, 2, ... decisions redrawn uniformly,
        # which keeps most of what was learned (a uniform draw would throw it all away).
        for attempt in range(self._max_retries):
            params, _ = self._draw(names, search_space)
            n_changed = min(1 + attempt * len(names) // max(self._max_retries, 1), len(names))
            for i in self._rng.choice(len(names), size=n_changed, replace=False):
                name = names[int(i)]
                params[name] = sample_other(search_space[name], params[name], self._rng)
            if not self._index.contains(params):
                return params
        return params

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        params, behaviour = self._draw([param_name], {param_name: param_distribution})
        self._behaviour.setdefault(trial.number, {}).update(behaviour)
        return params[param_name]

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        if state != TrialState.COMPLETE:
            self._behaviour.pop(trial.number, None)

    # ------------------------------------------------------------------ policy

    def _decision(self, name: str, distribution: BaseDistribution) -> tuple[list[Any], np.ndarray]:
        known = self._decisions.get(name)
        if known is None or known[0] != distribution:
            values = grid(distribution, n_bins=self._n_bins, max_int_bins=self._max_int_bins)
            known = (distribution, values, np.zeros(len(values)))
            self._decisions[name] = known
        return known[1], known[2]

    def _draw(
        self, names: list[str], space: dict[str, BaseDistribution]
    ) -> tuple[dict[str, Any], dict[str, tuple[int, float]]]:
        params: dict[str, Any] = {}
        behaviour: dict[str, tuple[int, float]] = {}
        for name in names:
            values, logits = self._decision(name, space[name])
            p = _softmax(logits)
            i = min(int(np.searchsorted(np.cumsum(p), self._rng.random(), side="right")), len(p) - 1)
            params[name] = values[i]
            behaviour[name] = (i, float(np.log(p[i])))
        return params, behaviour

    def _learn(self, study: Study) -> None:
        fresh = [
            t
            for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
            if t.number not in self._learned
        ]
        for t in sorted(fresh, key=lambda t: t.number):
            self._learned.add(t.number)
            if violation(t) > 0:
                # Over budget (a hard constraint): as bad as the worst trial seen, and kept off the front.
                reward = self._worst
            else:
                reward = self._reward(study.directions, t.values)
                if reward is not None:
                    self._worst = reward if self._worst is None else min(self._worst, reward)
            if reward is not None:
                self._update(t, reward)
            self._behaviour.pop(t.number, None)

    def _update(self, trial: FrozenTrial, reward: float) -> None:
        if self._baseline is None:  # the first reward only sets the baseline
            self._baseline = reward
            return
        diff = reward - self._baseline
        self._baseline += (1 - self._decay) * diff
        self._variance = self._decay * (self._variance + (1 - self._decay) * diff * diff)
        advantage = diff / math.sqrt(self._variance) if self._variance > 0 else 0.0
        behaviour = self._behaviour.get(trial.number, {})
        for name, value in trial.params.items():
            distribution = trial.distributions[name]
            values, logits = self._decision(name, distribution)
            a = nearest_index(distribution, values, value)
            if a is None:
                continue
            p = _softmax(logits)
            log_p = np.log(np.maximum(p, 1e-300))
            ratio = 1.0
            if name in behaviour and behaviour[name][0] == a:
                ratio = math.exp(float(log_p[a]) - behaviour[name][1])
            clipped = self._clip is not None and (
                (advantage > 0 and ratio > 1 + self._clip) or (advantage < 0 and ratio < 1 - self._clip)
            )
            grad_log_pi = -p
            grad_log_pi[a] += 1.0
            entropy = -float(np.sum(p * log_p))
            grad_entropy = -p * (log_p + entropy)
            step = (0.0 if clipped else ratio * advantage) * grad_log_pi + self._entropy_weight * grad_entropy
            logits += self._lr * step

    # ------------------------------------------------------------------ rewards

    def _reward(self, directions: Sequence[StudyDirection], values: Sequence[float] | None) -> float | None:
        if values is None or not all(math.isfinite(v) for v in values):
            return None
        if len(directions) == 1:
            return values[0] if directions[0] == StudyDirection.MAXIMIZE else -values[0]
        if self._reward_kind == "mnas":
            return self._mnas_reward(values)
        return self._hypervolume_reward(directions, values)

    def _mnas_reward(self, values: Sequence[float]) -> float:
        top = max(self._accuracy_index, self._latency_index)
        if top >= len(values):
            raise ValueError(
                f"accuracy_index/latency_index {top} is out of range; allowed: < {len(values)} objectives"
            )
        accuracy, latency = values[self._accuracy_index], values[self._latency_index]
        w = self._alpha if latency <= self._target else self._beta
        return float(accuracy * (max(latency, 1e-12) / self._target) ** w)

    def _hypervolume_reward(
        self, directions: Sequence[StudyDirection], values: Sequence[float]
    ) -> float | None:
        sign = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions])
        q = np.asarray(values, dtype=float) * sign
        if self._front is None or self._low is None or self._high is None:
            self._front, self._low, self._high = q[None, :], q.copy(), q.copy()
            return None  # no scale to measure against yet
        self._low, self._high = np.minimum(self._low, q), np.maximum(self._high, q)
        span = np.where(self._high > self._low, self._high - self._low, 1.0)
        front = (self._front - self._low) / span
        point = (q - self._low) / span
        minimise = ["min"] * len(q)
        reference = [_HV_REFERENCE] * len(q)
        # The gain over the front alone is 0 for every dominated trial, too sparse to learn from in
        # a few hundred trials; the trial's own box (a Pareto-compliant product scalarisation, like
        # MnasNet's) ranks dominated trials too, and the gain rewards extending the front.
        own = hypervolume(point[None, :], minimise, reference)
        gain = hypervolume(np.vstack([front, point]), minimise, reference) - hypervolume(
            front, minimise, reference
        )
        # Dominance is unchanged by the per-axis scaling, so the front is kept in raw units.
        stacked = np.vstack([self._front, q])
        self._front = stacked[non_dominated_mask(stacked, minimise)]
        return float(own + gain)
