"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020): 5 operations on the 6 edges of a 4-node cell."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna

from hwnas.spaces.candidate import COMPRESSION_KEYS
from hwnas.spaces.macro_cnn import (
    check_params,
    choice_list,
    positive_int,
    prune_ratio_choices,
    quant_choices,
)
from hwnas.spaces.training import from_config, is_train_key

if TYPE_CHECKING:
    from torch import nn

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
N_NODES = 4  # node 0 is the cell input, node 3 its output
EDGES = tuple((i, j) for i in range(1, N_NODES) for j in range(i))  # (to, from), in arch-string order
EDGE_KEYS = tuple(f"edge{i}_{j}" for i, j in EDGES)
ARCH_FORMAT = "|op~0|+|op~0|op~1|+|op~0|op~1|op~2|"


# ---- arch strings and isomorphism ----


def to_arch_string(candidate: Mapping[str, Any]) -> str:
    """Canonical NAS-Bench-201 string of the cell's six `edge{i}_{j}` entries."""
    for key in EDGE_KEYS:
        if key not in candidate:
            raise ValueError(f"candidate key {key!r} is missing; required: {', '.join(EDGE_KEYS)}")
        if candidate[key] not in OPS:
            raise ValueError(f"candidate {key}={candidate[key]!r} is not an op; allowed: {', '.join(OPS)}")
    nodes = (
        "|" + "|".join(f"{candidate[f'edge{i}_{j}']}~{j}" for j in range(i)) + "|" for i in range(1, N_NODES)
    )
    return "+".join(nodes)


def from_arch_string(arch: str) -> dict[str, str]:
    """The six `edge{i}_{j}` entries of a NAS-Bench-201 string."""
    bad = ValueError(
        f"arch string {arch!r} is not a NAS-Bench-201 cell; allowed: {ARCH_FORMAT} with op in {OPS}"
    )
    if not isinstance(arch, str):
        raise bad
    parts = arch.split("+")
    if len(parts) != N_NODES - 1:
        raise bad
    candidate: dict[str, str] = {}
    for i, part in enumerate(parts, start=1):
        if not (part.startswith("|") and part.endswith("|")):
            raise bad
        entries = part[1:-1].split("|")
        if len(entries) != i:
            raise bad
        for j, entry in enumerate(entries):
            op, _, source = entry.partition("~")
            if op not in OPS or source != str(j):
                raise bad
            candidate[f"edge{i}_{j}"] = op
    return candidate


def isomorphism_key(arch: str) -> str:
    """A key equal for cells that compute the same function (up to the weights).

    Each node is a sorted multiset of terms `op(source)`: sums commute; `skip_connect` splices in
    its source's terms (sums are associative); `none`, and any op applied to a zero node, adds
    nothing, so edges cut off from the input or from the output drop out. (A conv on a zero node
    really yields its BatchNorm's bias; like NAS-Bench-201 we count it as zero.) This collapses
    more than NAS-Bench-201's own rule, see `nb201_unique_str`.
    """
    cell = from_arch_string(arch)
    terms: list[tuple[str, ...]] = [("x",)]  # node 0: the cell input; () stands for zero
    for i in range(1, N_NODES):
        node: list[str] = []
        for j in range(i):
            op = cell[f"edge{i}_{j}"]
            if op == "none" or not terms[j]:
                continue
            if op == "skip_connect":
                node += terms[j]
            else:
                node.append(f"{op}({'+'.join(terms[j])})")
        terms.append(tuple(sorted(node)))
    return "+".join(terms[-1]) or "zero"


def nb201_unique_str(arch: str) -> str:
    """NAS-Bench-201's published rule (`to_unique_str(consider_zero=True)` in AutoDL-Projects).

    It gives the paper's 6,466 distinct cells, but keeps a zero as a term of a sum (x + 0 != x)
    and misses zero nodes whose inputs are all `none`; kept to compare with the literature.
    """
    cell = from_arch_string(arch)
    nodes = ["0"]
    for i in range(1, N_NODES):
        node = []
        for j in range(i):
            op = cell[f"edge{i}_{j}"]
            if op == "none" or nodes[j] == "#":
                node.append("#")
            elif op == "skip_connect":
                node.append(nodes[j])
            else:
                node.append(f"({nodes[j]})@{op}")
        nodes.append("+".join(sorted(node)))
    return nodes[-1]


# ---- the space ----


class NB201Space:
    """Six categorical edges `edge{i}_{j}` over `ops`.

    `prune_ratio` and `quant` are sampled only when their lists hold more than one value; otherwise
    they are left out of the candidate and the evaluator uses its defaults (no pruning, fp32).
    The optional `train:` block adds the `train.*` knobs (spaces/training.py) for evaluators that train
    (the pipeline); a table look-up has no training to change.
    """

    def __init__(
        self, ops: list[str], C: int, N: int, prune_ratios: list[float], quant: list[str],
        train: Mapping[str, Any] | None = None,
        distill: Mapping[str, Any] | None = None,
    ) -> None:
        self.ops = choice_list("ops", ops)
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"space.ops: {op!r} is not an op; allowed: {', '.join(OPS)}")
        self.C = positive_int("C", C)
        self.N = positive_int("N", N)
        self.prune_ratios = prune_ratio_choices(prune_ratios)
        self.quant = quant_choices(quant)
        self.train = from_config(train, distill)  # train.* and distill.* knobs

    def decisions(self) -> dict[str, list[Any]]:
        """Every edge and compression parameter the space can ever sample -> its choices (copies); the
        `train.*` knobs are `self.train`'s."""
        out: dict[str, list[Any]] = {key: list(self.ops) for key in EDGE_KEYS}
        if len(self.prune_ratios) > 1:
            out["prune_ratio"] = list(self.prune_ratios)
        if len(self.quant) > 1:
            out["quant"] = list(self.quant)
        return out

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        candidate = {key: trial.suggest_categorical(key, choices) for key, choices in self.decisions().items()}
        candidate.update(self.train.suggest(trial))
        return candidate

    def candidate_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        decisions = self.decisions()
        cell = check_params({k: v for k, v in params.items() if not is_train_key(k)}, decisions, list(decisions))
        return {**cell, **self.train.check(params)}

    def name(self, candidate: Mapping[str, Any]) -> str:
        """The cell's NAS-Bench-201 arch string (compression keys left out)."""
        return to_arch_string(candidate)

    def build(
        self, candidate: Mapping[str, Any], input_shape: tuple[int, int, int], num_classes: int
    ) -> nn.Module:
        arch = {k: v for k, v in candidate.items() if k not in COMPRESSION_KEYS and not is_train_key(k)}
        cell = check_params(arch, {key: list(self.ops) for key in EDGE_KEYS}, list(EDGE_KEYS))
        channels, height, width = (positive_int(f"input_shape[{i}]", v) for i, v in enumerate(input_shape))
        positive_int("num_classes", num_classes)
        # Both reductions halve the size on two paths (strided conv, 2x2 pool) that must agree.
        if height % 4 or width % 4:
            raise ValueError(
                f"candidate {to_arch_string(cell)} does not fit input {height}x{width}: two reductions "
                "halve it; allowed: height and width divisible by 4"
            )
        from hwnas.spaces.nb201_network import build_nb201_network  # torch: only when a network is built

        return build_nb201_network(cell, channels, self.C, self.N, num_classes)
