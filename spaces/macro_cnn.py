"""A macro CNN space for small images: a stem, then 1-6 stages of repeated blocks, each halving the size."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna

from hwnas.spaces.candidate import COMPRESSION_KEYS, FORMATS, arch_id
from hwnas.spaces.training import from_config, is_train_key

if TYPE_CHECKING:
    from torch import nn

BLOCK_KINDS = ("conv", "dwsep", "ir")
MAX_STAGES = 6
STAGE_FIELDS = ("depth", "width", "kernel", "block")
# Per-stage precision (space.stage_precision): `stage<k>.precision` among these, sampled only when the
# candidate's `quant` is int8; the int8 compressor keeps the fp32 stages float (evaluators/quantize.py).
PRECISIONS = ("fp32", "int8")
PRECISION_FIELD = "precision"


def is_precision_key(key: str) -> bool:
    return key.startswith("stage") and key.endswith("." + PRECISION_FIELD)


# Per-stage low-rank factorization (evaluators/lowrank.py): `stage<k>.rank_ratio`, a compression knob
# applied to the trained network, sampled only when space.rank_ratios is not [1.0].
RANK_FIELD = "rank_ratio"


def is_rank_key(key: str) -> bool:
    return key.startswith("stage") and key.endswith("." + RANK_FIELD)


# ---- constructor checks (shared with the other spaces) ----


def choice_list(key: str, values: Any) -> list[Any]:
    """A non-empty list without duplicates (Optuna categorical choices), or a one-line ValueError."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"space.{key}: {values!r} is not a list; allowed: a non-empty list of choices")
    items = list(values)  # also turns Hydra's ListConfig into a plain list
    if not items:
        raise ValueError(f"space.{key}: [] is empty; allowed: a non-empty list of choices")
    for i, item in enumerate(items):
        if item in items[:i]:
            raise ValueError(f"space.{key}: {item!r} is listed twice; allowed: each choice once")
    return items


def int_choices(key: str, values: Any, low: int, high: int | None = None) -> list[int]:
    """A choice list of ints in [low, high] (bools rejected: True is an int to Python, not to a user)."""
    items = choice_list(key, values)
    allowed = f"integers {low}..{high}" if high is not None else f"integers >= {low}"
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"space.{key}: {item!r} is not an integer; allowed: {allowed}")
        if item < low or (high is not None and item > high):
            raise ValueError(f"space.{key}: {item} is out of range; allowed: {allowed}")
    return items


def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"space.{key}: {value!r} is not a positive integer; allowed: integers >= 1")
    return value


def prune_ratio_choices(values: Any) -> list[float]:
    items = choice_list("prune_ratios", values)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"space.prune_ratios: {item!r} is not a number; allowed: 0 <= ratio < 1")
        if not 0 <= item < 1:
            raise ValueError(f"space.prune_ratios: {item} is out of range; allowed: 0 <= ratio < 1")
    return [float(item) for item in items]


def rank_ratio_choices(values: Any) -> list[float]:
    items = choice_list("rank_ratios", values)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"space.rank_ratios: {item!r} is not a number; allowed: 0 < ratio <= 1 (1.0: not factorized)")
        if not 0 < item <= 1:
            raise ValueError(f"space.rank_ratios: {item} is out of range; allowed: 0 < ratio <= 1 (1.0: not factorized)")
    return [float(item) for item in items]


def quant_choices(values: Any) -> list[str]:
    items = choice_list("quant", values)
    for item in items:
        if item not in FORMATS:
            raise ValueError(f"space.quant: {item!r} is not a format; allowed: {', '.join(FORMATS)}")
    return items


def check_params(params: Mapping[str, Any], decisions: Mapping[str, list[Any]], wanted: list[str]) -> dict:
    """Canonical candidate holding exactly the `wanted` keys, each value one of its choices."""
    for key in params:
        if key not in wanted:
            raise ValueError(f"candidate key {key!r} is not a parameter here; allowed: {', '.join(wanted)}")
    candidate: dict[str, Any] = {}
    for key in wanted:
        if key not in params:
            raise ValueError(f"candidate key {key!r} is missing; required: {', '.join(wanted)}")
        choices = decisions[key]
        value = params[key]
        if isinstance(value, bool) or value not in choices:
            raise ValueError(f"candidate {key}={value!r} is not a choice; allowed: {choices}")
        candidate[key] = choices[choices.index(value)]  # the choice's own type: 0 -> 0.0
    return candidate


# ---- the space ----


class MacroCNNSpace:
    """Stages of `depth` identical blocks; the first block of each stage has stride 2.

    Parameters: `n_stages`, `stage{i}.depth|width|kernel|block` for the active stages only,
    then `prune_ratio` and `quant`, then the `train.*` knobs of the optional `train:` block
    (spaces/training.py); the evaluator reads the last three groups, `build` ignores them.
    """

    def __init__(
        self,
        n_stages: list[int],
        depths: list[int],
        widths: list[int],
        kernels: list[int],
        blocks: list[str],
        expansions: list[int],
        stem_width: int,
        stem_stride: int,
        prune_ratios: list[float],
        quant: list[str],
        train: Mapping[str, Any] | None = None,
        distill: Mapping[str, Any] | None = None,
        stage_precision: bool = False,
        rank_ratios: list[float] | None = None,
    ) -> None:
        self.n_stages = int_choices("n_stages", n_stages, 1, MAX_STAGES)
        self.depths = int_choices("depths", depths, 1)
        self.widths = int_choices("widths", widths, 1)
        self.kernels = int_choices("kernels", kernels, 1)
        for kernel in self.kernels:
            if kernel % 2 == 0:
                raise ValueError(f"space.kernels: {kernel} is even; allowed: odd sizes (same padding)")
        self.blocks = choice_list("blocks", blocks)
        for block in self.blocks:
            if block not in BLOCK_KINDS:
                raise ValueError(f"space.blocks: {block!r} is not a block; allowed: {', '.join(BLOCK_KINDS)}")
        self.expansions = int_choices("expansions", expansions, 1)
        self.stem_width = positive_int("stem_width", stem_width)
        if stem_stride not in (1, 2):
            raise ValueError(f"space.stem_stride: {stem_stride!r} is not allowed; allowed: 1, 2")
        self.stem_stride = stem_stride
        self.prune_ratios = prune_ratio_choices(prune_ratios)
        self.quant = quant_choices(quant)
        self.train = from_config(train, distill)  # train.* and distill.* knobs
        if not isinstance(stage_precision, bool):
            raise ValueError(f"space.stage_precision: {stage_precision!r} is not a boolean; allowed: true, false")
        if stage_precision and "int8" not in self.quant:
            raise ValueError(
                f"space.stage_precision: true needs int8 among space.quant ({', '.join(self.quant)}): the stages "
                "choose between fp32 and int8 only in int8 candidates; allowed: false, or add int8 to space.quant"
            )
        self.stage_precision = stage_precision
        self.rank_ratios = rank_ratio_choices([1.0] if rank_ratios is None else rank_ratios)
        # Expansion is folded into the block name so that every stage has the same four parameters.
        self.block_choices: list[str] = []
        for block in self.blocks:
            self.block_choices += [f"ir{e}" for e in self.expansions] if block == "ir" else [block]

    def max_stages(self, height: int, width: int) -> int:
        """Most stages an input holds: the stem and every stage halve it, ending at >= 1 px."""
        stages, size = 0, min(height, width) // self.stem_stride
        while stages < MAX_STAGES and size >= 2:
            stages, size = stages + 1, size // 2
        return stages

    def fit_input(self, input_shape: tuple[int, int, int]) -> list[str]:
        """Keep the stage counts the data's resolution holds (called once the data is known, before any
        sampling): 4 stages at 32 px end at 1x1; at 16 px the 4th would have nothing left to halve."""
        _, height, width = input_shape
        most = self.max_stages(height, width)
        kept = [n for n in self.n_stages if n <= most]
        if not kept:
            raise ValueError(
                f"space.n_stages: none of {self.n_stages} fits a {height}x{width} input with stem_stride "
                f"{self.stem_stride}; allowed: n_stages <= {most} (or a higher dataset.resolution)"
            )
        dropped = [n for n in self.n_stages if n > most]
        self.n_stages = kept
        if not dropped:
            return []
        return [f"space.n_stages: {dropped} dropped: a {height}x{width} input holds at most {most} stages (stem stride {self.stem_stride})"]

    def stage_choices(self) -> dict[str, list[Any]]:
        return {
            "depth": self.depths,
            "width": self.widths,
            "kernel": self.kernels,
            "block": self.block_choices,
        }

    def decisions(self) -> dict[str, list[Any]]:
        """Every architecture and compression parameter the space can ever sample -> its choices (copies);
        the `train.*` knobs (ranges as well as lists) are `self.train`'s."""
        out: dict[str, list[Any]] = {"n_stages": list(self.n_stages)}
        for i in range(1, max(self.n_stages) + 1):
            for field, choices in self.stage_choices().items():
                out[f"stage{i}.{field}"] = list(choices)
        out["prune_ratio"] = list(self.prune_ratios)
        out["quant"] = list(self.quant)
        for key in self.precision_keys(max(self.n_stages), "int8"):
            out[key] = list(PRECISIONS)
        for key in self.rank_keys(max(self.n_stages)):
            out[key] = list(self.rank_ratios)
        return out

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        candidate: dict[str, Any] = {"n_stages": trial.suggest_categorical("n_stages", self.n_stages)}
        for i in range(1, candidate["n_stages"] + 1):
            for field, choices in self.stage_choices().items():
                candidate[f"stage{i}.{field}"] = trial.suggest_categorical(f"stage{i}.{field}", choices)
        candidate["prune_ratio"] = trial.suggest_categorical("prune_ratio", self.prune_ratios)
        candidate["quant"] = trial.suggest_categorical("quant", self.quant)
        for key in self.precision_keys(candidate["n_stages"], candidate["quant"]):
            candidate[key] = trial.suggest_categorical(key, list(PRECISIONS))
        for key in self.rank_keys(candidate["n_stages"]):
            candidate[key] = trial.suggest_categorical(key, self.rank_ratios)
        candidate.update(self.train.suggest(trial))
        return candidate

    def candidate_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate `params` (e.g. trial.params) and return the canonical candidate."""
        n_stages = self.checked_n_stages(params)
        wanted = ["n_stages", *self.stage_keys(n_stages), "prune_ratio", "quant", *self.rank_keys(n_stages)]
        wanted += self.precision_keys(self.checked_n_stages(params), params.get("quant"))
        net = {k: v for k, v in params.items() if not is_train_key(k)}
        return {**check_params(net, self.decisions(), wanted), **self.train.check(params)}

    def random_architectures(self, n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
        """`n` distinct architectures (by name) drawn uniformly per decision with a seeded numpy RNG,
        uncompressed (prune_ratio 0, fp32): the networks benchmarks time (at most as many as exist)."""
        decisions = self.decisions()
        rng = np.random.default_rng(seed)
        out: dict[str, dict[str, Any]] = {}
        for _ in range(100 * n):  # bounded: a small space has fewer than n distinct networks
            if len(out) >= n:
                break
            params: dict[str, Any] = {"n_stages": int(rng.choice(decisions["n_stages"]))}
            for key in self.stage_keys(params["n_stages"]):
                choices = decisions[key]
                params[key] = choices[int(rng.integers(len(choices)))]
            wanted = ["n_stages", *self.stage_keys(params["n_stages"]), "prune_ratio", "quant"]
            candidate = check_params({**params, "prune_ratio": 0.0, "quant": "fp32"}, decisions, wanted)
            out.setdefault(self.name(candidate), candidate)
        return list(out.items())

    def largest(self) -> dict[str, Any]:
        """The space's largest network (most stages, deepest, widest, largest kernel; plain convolutions where
        allowed): the default distillation teacher (compression.distill.teacher: train)."""
        n_stages = max(self.n_stages)
        block = "conv" if "conv" in self.block_choices else self.block_choices[-1]
        arch: dict[str, Any] = {"n_stages": n_stages}
        for i in range(1, n_stages + 1):
            arch.update({f"stage{i}.depth": max(self.depths), f"stage{i}.width": max(self.widths),
                         f"stage{i}.kernel": max(self.kernels), f"stage{i}.block": block})
        return arch

    def checked_n_stages(self, params: Mapping[str, Any]) -> int:
        if "n_stages" not in params:
            raise ValueError("candidate key 'n_stages' is missing; required: n_stages")
        return check_params({"n_stages": params["n_stages"]}, self.decisions(), ["n_stages"])["n_stages"]

    def rank_keys(self, n_stages: int) -> list[str]:
        """`stage<k>.rank_ratio` of the active stages; none while the knob is off (rank_ratios [1.0])."""
        if self.rank_ratios == [1.0]:
            return []
        return [f"stage{i}.{RANK_FIELD}" for i in range(1, n_stages + 1)]

    def low_rank(self, candidate: Mapping[str, Any]) -> dict[str, float]:
        """Module path in `build`'s network -> the rank ratio of its stage (stage k is child `k`; the stem
        and the classifier are never factorized), for the stages the candidate holds a ratio for."""
        out: dict[str, float] = {}
        for key, value in candidate.items():
            if is_rank_key(key):
                stage = key[len("stage"):-len(RANK_FIELD) - 1]
                out[stage] = float(value)
        return out

    def precision_keys(self, n_stages: int, quant: Any) -> list[str]:
        """`stage<k>.precision` of the active stages of an int8 candidate; none with the knob off."""
        if not self.stage_precision or quant != "int8":
            return []
        return [f"stage{i}.{PRECISION_FIELD}" for i in range(1, n_stages + 1)]

    def float_modules(self, candidate: Mapping[str, Any]) -> list[str]:
        """Children of `build`'s network that stay float32 in the int8 file: stage k (child `k`) when
        `stage<k>.precision` is fp32, and the pooling and flatten after the last stage when that stage
        is fp32 (quantizing them alone would only add Quantize/Dequantize). Empty unless quant is int8."""
        if candidate.get("quant") != "int8":
            return []
        n_stages = int(candidate["n_stages"])
        fp32 = [i for i in range(1, n_stages + 1) if candidate.get(f"stage{i}.{PRECISION_FIELD}") == "fp32"]
        tail = [n_stages + 1, n_stages + 2] if n_stages in fp32 else []  # AdaptiveAvgPool2d, Flatten
        return [str(i) for i in fp32 + tail]

    @staticmethod
    def stage_keys(n_stages: int) -> list[str]:
        return [f"stage{i}.{field}" for i in range(1, n_stages + 1) for field in STAGE_FIELDS]

    def name(self, candidate: Mapping[str, Any]) -> str:
        """Readable architecture name (compression left out), e.g. `conv16k3d2-ir6w32k5d1`."""
        arch = self.architecture(candidate)
        return "-".join(
            f"{arch[f'stage{i}.block']}w{arch[f'stage{i}.width']}"
            f"k{arch[f'stage{i}.kernel']}d{arch[f'stage{i}.depth']}"
            for i in range(1, arch["n_stages"] + 1)
        )

    def architecture(self, candidate: Mapping[str, Any]) -> dict[str, Any]:
        """The validated architecture keys of `candidate`; compression and `train.*` keys may be present or not."""
        arch = {k: v for k, v in candidate.items() if k not in COMPRESSION_KEYS and not is_train_key(k)}
        arch = {k: v for k, v in arch.items() if not is_rank_key(k)}
        arch = {k: v for k, v in arch.items() if not is_precision_key(k)}
        wanted = ["n_stages", *self.stage_keys(self.checked_n_stages(arch))]
        return check_params(arch, self.decisions(), wanted)

    def build(
        self, candidate: Mapping[str, Any], input_shape: tuple[int, int, int], num_classes: int
    ) -> nn.Module:
        arch = self.architecture(candidate)
        channels, height, width = (positive_int(f"input_shape[{i}]", v) for i, v in enumerate(input_shape))
        positive_int("num_classes", num_classes)
        smallest = 2 ** arch["n_stages"] * self.stem_stride
        if min(height, width) < smallest:
            raise ValueError(
                f"candidate {arch_id(candidate)} (n_stages={arch['n_stages']}) does not fit input "
                f"{height}x{width}: the stem and each stage halve the size; allowed: height and width >= {smallest}"
            )
        # torch only here: sampling and validating candidates (the driver's work) never needs it.
        from torch import nn

        from hwnas.spaces.blocks import ConvBNReLU, make_block

        layers: list[nn.Module] = [ConvBNReLU(channels, self.stem_width, 3, stride=self.stem_stride)]
        in_ch = self.stem_width
        for i in range(1, arch["n_stages"] + 1):
            out_ch, kernel, block = arch[f"stage{i}.width"], arch[f"stage{i}.kernel"], arch[f"stage{i}.block"]
            stage = [
                make_block(block, in_ch if d == 0 else out_ch, out_ch, kernel, 2 if d == 0 else 1)
                for d in range(arch[f"stage{i}.depth"])
            ]
            layers.append(nn.Sequential(*stage))
            in_ch = out_ch
        return nn.Sequential(
            *layers,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_ch, num_classes),
        )
