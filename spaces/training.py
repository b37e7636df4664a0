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

Distillation's knobs (item 3) are a second family of the same kind, the space's `distill:` block:

    distill:
      temperature: [2.0, 4.0, 8.0]              # softening of both logits (Hinton et al. 2015)
      weight: {low: 0.3, high: 0.9}             # share of the loss that is the teacher's

named `distill.temperature` and `distill.weight`; the teacher itself is `compression.distill.teacher`.
Nothing here imports torch: the driver validates the block before any trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import optuna

from hwnas.evaluators.training_options import OPTIMIZERS

PREFIX = "train."
DISTILL_PREFIX = "distill."
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
DISTILL_KNOBS: dict[str, tuple[str, str]] = {
    "temperature": ("float", "a finite float > 0"),
    "weight": ("float", "a float 0 <= w <= 1"),
}
# family prefix -> (its knobs, the space's config key)
FAMILIES: dict[str, tuple[dict[str, tuple[str, str]], str]] = {
    PREFIX: (KNOBS, "space.train"),
    DISTILL_PREFIX: (DISTILL_KNOBS, "space.distill"),
}
_KIND = {PREFIX: "training", DISTILL_PREFIX: "distillation"}
RANGE_KEYS = frozenset({"low", "high", "log"})


def is_train_key(key: str) -> bool:
    """A parameter that changes how the network is trained, not what it is: `train.*` and `distill.*`."""
    return key.startswith(PREFIX) or key.startswith(DISTILL_PREFIX)


def _value_ok(key: str, value: Any, table: Mapping[str, tuple[str, str]] = KNOBS) -> bool:
    kind = table[key][0]
    if isinstance(value, bool):
        return False
    if kind == "str":
        return value in OPTIMIZERS
    if kind == "int":
        return isinstance(value, int) and value >= 1
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if key in ("lr", "temperature"):
        return value > 0
    if key == "weight_decay":
        return value >= 0
    if key == "weight":
        return 0 <= value <= 1
    return 0 <= value < 1  # momentum, label_smoothing


def check_value(key: str, value: Any, where: str, prefix: str = PREFIX) -> Any:
    """One value of the family `prefix` (`key` without the prefix), or a one-line ValueError naming `where`."""
    table = FAMILIES[prefix][0]
    if key not in table:
        raise ValueError(f"{where}: {key!r} is not a {_KIND[prefix]} knob; allowed: {', '.join(table)}")
    if not _value_ok(key, value, table):
        raise ValueError(f"{where}: {value!r} is not allowed; allowed: {table[key][1]}")
    return float(value) if table[key][0] == "float" else value


def training_values(candidate: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate's `train.*` values, prefix removed and each checked (a candidate may come from an
    untrusted run folder): what the evaluator uses over its defaults. {} when there are none."""
    out: dict[str, Any] = {}
    for name, value in candidate.items():
        if name.startswith(PREFIX):
            out[name[len(PREFIX):]] = check_value(name[len(PREFIX):], value, f"candidate {name}")
    if "momentum" in out and out.get("optimizer") != "sgd":
        raise ValueError(f"candidate {PREFIX}momentum: set without {PREFIX}optimizer=sgd; allowed: momentum with sgd only")
    return out


def distill_values(candidate: Mapping[str, Any]) -> dict[str, float]:
    """The candidate's `distill.*` values (temperature, weight), prefix removed and checked. {} when none."""
    return {
        name[len(DISTILL_PREFIX):]: check_value(name[len(DISTILL_PREFIX):], value, f"candidate {name}", DISTILL_PREFIX)
        for name, value in candidate.items()
        if name.startswith(DISTILL_PREFIX)
    }


class _Knob:
    """One knob: a list of choices (categorical) or a {low, high, log} range (float or int)."""

    def __init__(self, key: str, spec: Any, prefix: str = PREFIX) -> None:
        table, block = FAMILIES[prefix]
        where = f"{block}.{key}"
        self.key, self.name, self.prefix = key, prefix + key, prefix
        kind = table[key][0]
        self.choices: list[Any] | None = None
        if isinstance(spec, Mapping):
            if kind == "str":
                raise ValueError(f"{where}: a range is not allowed; allowed: a list of {table[key][1]}")
            extra = sorted(set(spec) - RANGE_KEYS)
            if extra or "low" not in spec or "high" not in spec:
                raise ValueError(f"{where}: {dict(spec)!r} is not a range; allowed: {{low, high, log}} or a list of choices")
            self.low = check_value(key, spec["low"], f"{where}.low", prefix)
            self.high = check_value(key, spec["high"], f"{where}.high", prefix)
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
                value = check_value(key, item, where, prefix)
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
        value = check_value(self.key, value, f"candidate {self.name}", self.prefix)
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"candidate {self.name}={value!r} is not a choice; allowed: {self.choices}")
            return self.choices[self.choices.index(value)]
        if not self.low <= value <= self.high:
            raise ValueError(f"candidate {self.name}={value!r} is out of range; allowed: {self.low}..{self.high}")
        return value


def _family(prefix: str, config: Any) -> dict[str, _Knob]:
    """One block (`space.train`, `space.distill`) -> its knobs by parameter name; a null knob is the default."""
    table, block = FAMILIES[prefix]
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"{block}: {config!r} is not a mapping; allowed: null or a mapping of {', '.join(table)}")
    for key in config:
        if key not in table:
            raise ValueError(f"{block}.{key}: not a {_KIND[prefix]} knob; allowed: {', '.join(table)}")
    return {prefix + key: _Knob(key, config[key], prefix) for key in table if config.get(key) is not None}


class TrainingKnobs:
    """A space's `train:` and `distill:` blocks, validated; samples and checks the `train.*` and
    `distill.*` parameters."""

    def __init__(self, config: Mapping[str, Any] | None, distill: Mapping[str, Any] | None = None) -> None:
        # Keyed by parameter name (train.lr, distill.weight), in the order of sampling.
        self.knobs = {**_family(PREFIX, config), **_family(DISTILL_PREFIX, distill)}
        momentum, optimizer = self.knobs.get(PREFIX + "momentum"), self.knobs.get(PREFIX + "optimizer")
        if momentum is not None and (optimizer is None or "sgd" not in (optimizer.choices or [])):
            raise ValueError("space.train.momentum: needs train.optimizer with sgd among its choices; "
                             "allowed: momentum only beside an optimizer list holding sgd")

    def __bool__(self) -> bool:
        return bool(self.knobs)

    @property
    def distills(self) -> bool:
        """Whether `distill.*` knobs are searched (they need a teacher: compression.distill.teacher)."""
        return any(name.startswith(DISTILL_PREFIX) for name in self.knobs)

    def _active(self, optimizer: Any) -> list[_Knob]:
        return [k for k in self.knobs.values() if k.name != PREFIX + "momentum" or optimizer == "sgd"]

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample the `train.*` parameters (momentum only when the sampled optimizer is sgd)."""
        out: dict[str, Any] = {}
        for knob in self.knobs.values():
            if knob.name == PREFIX + "momentum" and out.get(PREFIX + "optimizer") != "sgd":
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
                allowed = ", ".join(wanted) or "none (space.train and space.distill are off)"
                raise ValueError(f"candidate key {key!r} is not a parameter here; allowed: {allowed}")
        out: dict[str, Any] = {}
        for name in wanted:
            if name not in params:
                raise ValueError(f"candidate key {name!r} is missing; required: {', '.join(wanted)}")
            out[name] = self.knobs[name].check(params[name])
        return out

    def decisions(self) -> dict[str, list[Any]]:
        """The categorical knobs -> their choices (ranges are not finite decisions)."""
        return {k.name: list(k.choices) for k in self.knobs.values() if k.choices is not None}


def _plain(config: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf  # comes with Hydra

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config


def from_config(config: Any, distill: Any = None) -> TrainingKnobs:
    """`space.train` and `space.distill` as Hydra hands them (DictConfig, dict or None) -> TrainingKnobs."""
    return TrainingKnobs(_plain(config), _plain(distill))
