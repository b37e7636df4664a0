"""Search strategies as Optuna samplers, so they run unchanged in an ask/tell loop or with trials placed by Ray Tune (search/broker.py asks and tells)."""

from __future__ import annotations

from hwnas.search.samplers.regularized_evolution import RegularizedEvolutionSampler
from hwnas.search.samplers.rl_controller import RLControllerSampler

__all__ = ["RLControllerSampler", "RegularizedEvolutionSampler"]
