"""Training hyperparameters as searchable knobs: a space's optional `train:` block (issue 13, item 5).

    train:
      lr: {low: 1.0e-4, high: 0.1, log: true}   # a range (float), or a list of choices
      weight_decay: [0, 1.0e-4, 1.0e-3]
      batch_size: [32, 64, 128]
      optimizer: [adam, sgd, adamw]
      momentum: [0.8, 0.9]                      # conditional: sampled only when train.optimizer is sgd
      label_smoothing: [0.0, 0.1]
      epochs: [2, 4, 6]

Any subset; a key left out (or `train: null`, the default) is the evaluator's own setting. Each knob is
an Optuna parameter named `train.<key>` (so it shows as such in trials.csv and MLflow), part of the
candidate: `arch_id` and `net_id` tell apart candidates trained differently (their weights differ).
Nothing here imports torch: the driver validates the block before any trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import optuna

from hwnas.evaluators.training_options import OPTIMIZERS

PREFIX = "train."
# key -> (kind, what is allowed); the order is the order of sampling.
KNOBS: dict[str, tuple[str, str]] = {
    "lr": ("float", "a finite float > 0"),
    "weight_decay": ("float", "a finite float >= 0"),
    "batch_size": ("int", "an int >= 1"),
    "optimizer": ("str", ", ".join(OPTIMIZERS)),
    "momentum": ("float", "a float 0 <= m < 1"),
    "label_smoothing": ("float", "a float 0 <= s < 1"),
    "epochs": ("int", "an int >= 1"),
}
RANGE_KEYS = frozenset({"low", "high", "log"})


def is_train_key(key: str) -> bool:
    return key.startswith(PREFIX)


def _value_ok(key: str, value: Any) -> bool:
    kind = KNOBS[key][0]
    if isinstance(value, bool):
        return False
    if kind == "str":
        return value in OPTIMIZERS
    if kind == "int":
        return isinstance(value, int) and value >= 1
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if key == "lr":
        return value > 0
    if key == "weight_decay":
        return value >= 0
    return 0 <= value < 1  # momentum, label_smoothing


def check_value(key: str, value: Any, where: str) -> Any:
    """One training value (`key` without the prefix), or a one-line ValueError naming `where`."""
    if key not in KNOBS:
        raise ValueError(f"{where}: {key!r} is not a training knob; allowed: {', '.join(KNOBS)}")
    if not _value_ok(key, value):
        raise ValueError(f"{where}: {value!r} is not allowed; allowed: {KNOBS[key][1]}")
    return float(value) if KNOBS[key][0] == "float" else value


def training_values(candidate: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate's `train.*` values, prefix removed and each checked (a candidate may come from an
    untrusted run folder): what the evaluator uses over its defaults. {} when there are none."""
    out: dict[str, Any] = {}
    for name, value in candidate.items():
        if is_train_key(name):
            out[name[len(PREFIX):]] = check_value(name[len(PREFIX):], value, f"candidate {name}")
    if "momentum" in out and out.get("optimizer") != "sgd":
        raise ValueError(f"candidate {PREFIX}momentum: set without {PREFIX}optimizer=sgd; allowed: momentum with sgd only")
    return out


class _Knob:
    """One knob: a list of choices (categorical) or a {low, high, log} range (float or int)."""

    def __init__(self, key: str, spec: Any) -> None:
        where = f"space.train.{key}"
        self.key, self.name = key, PREFIX + key
        kind = KNOBS[key][0]
        self.choices: list[Any] | None = None
        if isinstance(spec, Mapping):
            if kind == "str":
                raise ValueError(f"{where}: a range is not allowed; allowed: a list of {KNOBS[key][1]}")
            extra = sorted(set(spec) - RANGE_KEYS)
            if extra or "low" not in spec or "high" not in spec:
                raise ValueError(f"{where}: {dict(spec)!r} is not a range; allowed: {{low, high, log}} or a list of choices")
            self.low = check_value(key, spec["low"], f"{where}.low")
            self.high = check_value(key, spec["high"], f"{where}.high")
            self.log = spec.get("log", False)
            if not isinstance(self.log, bool):
                raise ValueError(f"{where}.log: {self.log!r} is not allowed; allowed: true, false")
            if not self.low < self.high:
                raise ValueError(f"{where}: low {self.low!r} >= high {self.high!r}; allowed: low < high")
            if self.log and self.low <= 0:
                raise ValueError(f"{where}.low: {self.low!r} with log: true; allowed: low > 0 on a log scale")
            self.int = kind == "int"
        elif isinstance(spec, Iterable) and not isinstance(spec, (str, bytes)):
            items = list(spec)
            if not items:
                raise ValueError(f"{where}: [] is empty; allowed: a non-empty list of choices or a {{low, high, log}} range")
            choices: list[Any] = []
            for item in items:
                value = check_value(key, item, where)
                if value in choices:
                    raise ValueError(f"{where}: {item!r} is listed twice; allowed: each choice once")
                choices.append(value)
            self.choices = choices
        else:
            raise ValueError(f"{where}: {spec!r} is not allowed; allowed: a list of choices or a {{low, high, log}} range")

    def suggest(self, trial: optuna.trial.BaseTrial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.int:
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def check(self, value: Any) -> Any:
        value = check_value(self.key, value, f"candidate {self.name}")
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"candidate {self.name}={value!r} is not a choice; allowed: {self.choices}")
            return self.choices[self.choices.index(value)]
        if not self.low <= value <= self.high:
            raise ValueError(f"candidate {self.name}={value!r} is out of range; allowed: {self.low}..{self.high}")
        return value


class TrainingKnobs:
    """A space's `train:` block, validated; samples and checks the `train.*` parameters."""

    def __init__(self, config: Mapping[str, Any] | None) -> None:
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ValueError(f"space.train: {config!r} is not a mapping; allowed: null or a mapping of {', '.join(KNOBS)}")
        for key in config:
            if key not in KNOBS:
                raise ValueError(f"space.train.{key}: not a training knob; allowed: {', '.join(KNOBS)}")
        # A null knob is the evaluator's default, like a missing one.
        self.knobs = {key: _Knob(key, config[key]) for key in KNOBS if config.get(key) is not None}
        momentum, optimizer = self.knobs.get("momentum"), self.knobs.get("optimizer")
        if momentum is not None and (optimizer is None or "sgd" not in (optimizer.choices or [])):
            raise ValueError("space.train.momentum: needs train.optimizer with sgd among its choices; "
                             "allowed: momentum only beside an optimizer list holding sgd")

    def __bool__(self) -> bool:
        return bool(self.knobs)

    def _active(self, optimizer: Any) -> list[_Knob]:
        return [k for k in self.knobs.values() if k.key != "momentum" or optimizer == "sgd"]

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample the `train.*` parameters (momentum only when the sampled optimizer is sgd)."""
        out: dict[str, Any] = {}
        for knob in self.knobs.values():
            if knob.key == "momentum" and out.get(PREFIX + "optimizer") != "sgd":
                continue
            out[knob.name] = knob.suggest(trial)
        return out

    def names(self, params: Mapping[str, Any]) -> list[str]:
        """The `train.*` parameter names a candidate with these params holds."""
        return [k.name for k in self._active(params.get(PREFIX + "optimizer"))]

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The canonical `train.*` part of a candidate: exactly the active knobs, each value allowed.
        Other keys of `params` are left to the space."""
        wanted = self.names(params)
        for key in params:
            if is_train_key(key) and key not in wanted:
                allowed = ", ".join(wanted) or "none (space.train is off)"
                raise ValueError(f"candidate key {key!r} is not a parameter here; allowed: {allowed}")
        out: dict[str, Any] = {}
        for name in wanted:
            if name not in params:
                raise ValueError(f"candidate key {name!r} is missing; required: {', '.join(wanted)}")
            out[name] = self.knobs[name[len(PREFIX):]].check(params[name])
        return out

    def decisions(self) -> dict[str, list[Any]]:
        """The categorical knobs -> their choices (ranges are not finite decisions)."""
        return {k.name: list(k.choices) for k in self.knobs.values() if k.choices is not None}


def from_config(config: Any) -> TrainingKnobs:
    """`space.train` as Hydra hands it (DictConfig, dict or None) -> TrainingKnobs."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with Hydra
        pass
    return TrainingKnobs(config)
