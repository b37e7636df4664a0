"""What every search space offers: define-by-run sampling on an Optuna trial, and a builder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import optuna

if TYPE_CHECKING:
    from torch import nn


@runtime_checkable
class SearchSpace(Protocol):
    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample one candidate with trial.suggest_*; return it as a flat dict of the sampled values.

        The returned dict holds exactly the values of the parameters that are active for this
        candidate (e.g. no `stage4.*` keys when `n_stages=3`), keyed by the same names as the
        Optuna parameters, so `candidate == trial.params` (modulo key order).
        """

    def build(self, candidate: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """Build the (uncompressed, float32) network. Same candidate + same torch seed -> same model."""


def fit_input(space: Any, input_shape: tuple[int, int, int]) -> list[str]:
    """Let a space adapt to the data before any candidate is sampled (optional `fit_input` method):
    e.g. drop stage counts a small input cannot hold. Returns what changed, one note per line;
    ValueError when no candidate of the space fits the input."""
    fit = getattr(space, "fit_input", None)
    return list(fit(input_shape)) if fit is not None else []
