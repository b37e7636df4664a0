"""The objectives of a sweep (names, directions) and its budgets, read from `cfg.objective`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.study import StudyDirection

# Constraint value of a bound on a metric the trial did not report: violated, by a finite amount.
MISSING_VIOLATION = 1e9


@dataclass(frozen=True)
class Objectives:
    names: tuple[str, ...]
    modes: tuple[str, ...]  # 'max' | 'min' per name
    # metric -> (kind, bound): kind 'upper' means value <= bound is feasible, 'lower' means value >= bound.
    bounds: Mapping[str, tuple[str, float]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, objective: Mapping[str, Any]) -> Objectives:
        names = tuple(m["name"] for m in objective["metrics"])
        modes = tuple(m["mode"] for m in objective["metrics"])
        limits = dict(objective["budgets"])
        if objective["latency_budget_ms"] is not None:
            limits["latency_ms"] = objective["latency_budget_ms"]
        mode_of = dict(zip(names, modes, strict=True))
        # A budget on something maximised is a floor; on anything else (minimised or only reported) a ceiling.
        bounds = {k: ("lower" if mode_of.get(k) == "max" else "upper", float(v)) for k, v in limits.items()}
        return cls(names, modes, bounds)

    @property
    def optuna_directions(self) -> list[StudyDirection]:
        return [StudyDirection.MAXIMIZE if m == "max" else StudyDirection.MINIMIZE for m in self.modes]

    def values(self, metrics: Mapping[str, float]) -> list[float]:
        missing = [n for n in self.names if n not in metrics]
        if missing:
            raise KeyError(f"objective metric {missing[0]!r} was not reported; reported: {', '.join(sorted(metrics))}")
        return [float(metrics[n]) for n in self.names]

    def is_feasible(self, metrics: Mapping[str, Any]) -> bool:
        return all(c <= 0 for c in (self.constraints(metrics) or {}).values())

    def constraints(self, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Per bounded metric, <= 0 when the bound is met (Optuna's convention); None without bounds.

        A metric the trial did not report violates its bound by a large finite amount: samplers
        fit models to these values, and an infinity would break them.
        """
        if not self.bounds:
            return None
        out = {}
        for name, (kind, bound) in self.bounds.items():
            value = metrics.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                out[name] = MISSING_VIOLATION
            else:
                out[name] = float(value) - bound if kind == "upper" else bound - float(value)
        return out

    def matrix(self, rows: list[Mapping[str, Any]]) -> np.ndarray:
        return np.array([[float(r[n]) for n in self.names] for r in rows], dtype=float).reshape(len(rows), len(self.names))

    @property
    def budget_label(self) -> str:
        return ", ".join(f"{k} {'<=' if kind == 'upper' else '>='} {v:g}" for k, (kind, v) in self.bounds.items())
