from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

import hydra.utils
import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
import torch_pruning as tp
from omegaconf import OmegaConf

from hwnas.spaces.base import SearchSpace
from hwnas.spaces.nb201 import (
    EDGE_KEYS,
    OPS,
    NB201Space,
    from_arch_string,
    isomorphism_key,
    nb201_unique_str,
    to_arch_string,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "space" / "nb201.yaml"
TABLE = ROOT.parent / "shared" / "benchmarks" / "nb201_accuracy.csv"
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def small_space(prune_ratios: list[float] | None = None, quant: list[str] | None = None) -> NB201Space:
    return NB201Space(ops=list(OPS), C=8, N=1, prune_ratios=prune_ratios or [0.0], quant=quant or ["fp32"])


def random_cells(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{key: rng.choice(OPS) for key in EDGE_KEYS} for _ in range(n)]


def test_default_config_instantiates_and_is_a_search_space() -> None:
    space = hydra.utils.instantiate(OmegaConf.load(CONF))
    assert isinstance(space, NB201Space) and isinstance(space, SearchSpace)
    assert (space.C, space.N) == (16, 5)
    assert list(space.decisions()) == list(EDGE_KEYS)
    torch.manual_seed(0)
    with torch.no_grad():
        model = space.build(random_cells(1, seed=1)[0], (3, 32, 32), 10)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_arch_string_round_trip_over_the_whole_space() -> None:
    for ops in itertools.product(OPS, repeat=len(EDGE_KEYS)):
        cell = dict(zip(EDGE_KEYS, ops, strict=True))
        arch = to_arch_string(cell)
        assert from_arch_string(arch) == cell
    assert to_arch_string(from_arch_string(ALL_NONE)) == ALL_NONE
    cell = dict(
        zip(
            EDGE_KEYS,
            ["nor_conv_3x3", "skip_connect", "none", "avg_pool_3x3", "nor_conv_1x1", "none"],
            strict=True,
        )
    )
    assert to_arch_string(cell) == (
        "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "|none~0|+|none~0|none~1|",
        "|none~0|+|none~0|none~1|+|none~0|none~1|none~2",
        "|none~0|+|none~0|none~2|+|none~0|none~1|none~2|",
        "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|",
        "|none~0|+|none~0|none~1|none~1|+|none~0|none~1|none~2|",
    ],
)
def test_bad_arch_strings_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^arch string .* is not a NAS-Bench-201 cell") as info:
        from_arch_string(bad)
    assert repr(bad) in str(info.value) and "\n" not in str(info.value)


def test_isomorphism_known_cases() -> None:
    # Cut off from the output: all-none, none into node 3, or node 2 zero and node 3 fed only by it.
    cut_off = [
        ALL_NONE,
        "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|none~1|none~2|",
        "|none~0|+|none~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|nor_conv_1x1~2|",
    ]
    assert {isomorphism_key(a) for a in cut_off} == {"zero"}
    # The sum at node 3 commutes: conv3(x) + pool(node1) == pool(node1) + conv3(x) via another route.
    a = "|nor_conv_1x1~0|+|nor_conv_3x3~0|none~1|+|none~0|avg_pool_3x3~1|skip_connect~2|"
    b = "|nor_conv_1x1~0|+|none~0|avg_pool_3x3~1|+|nor_conv_3x3~0|none~1|skip_connect~2|"
    assert isomorphism_key(a) == isomorphism_key(b)
    # Dead edges that do not reach the output do not matter.
    c = "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|none~2|"
    d = "|avg_pool_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|"
    assert isomorphism_key(c) == isomorphism_key(d) == "x"
    # Different ops, or the same ops wired differently, are different networks.
    e = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|nor_conv_1x1~1|none~2|"
    f = "|nor_conv_1x1~0|+|none~0|none~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"
    g = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"
    assert len({isomorphism_key(s) for s in (e, f, g, a, ALL_NONE)}) == 5


def test_nb201_unique_str_matches_the_reference_rule_on_known_cases() -> None:
    assert nb201_unique_str(ALL_NONE) == "#+#+#"
    a = "|nor_conv_1x1~0|+|nor_conv_3x3~0|none~1|+|none~0|avg_pool_3x3~1|skip_connect~2|"
    b = "|nor_conv_1x1~0|+|none~0|avg_pool_3x3~1|+|nor_conv_3x3~0|none~1|skip_connect~2|"
    assert nb201_unique_str(a) != nb201_unique_str(b)  # the reference rule does not flatten skip sums


@pytest.mark.skipif(not TABLE.exists(), reason=f"benchmark table not at {TABLE}")
def test_distinct_networks_on_the_real_table() -> None:
    with TABLE.open() as f:
        archs = [row["arch"] for row in csv.DictReader(f)]
    assert len(set(archs)) == 15_625
    # NAS-Bench-201's own rule reproduces the paper's count exactly; ours also merges x + 0 with x and
    # splices skip sums, so fewer distinct functions remain.
    assert len({nb201_unique_str(a) for a in archs}) == 6_466
    assert len({isomorphism_key(a) for a in archs}) == 4_930


def test_suggest_with_fixed_compression_samples_only_edges() -> None:
    space = small_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        candidate = space.suggest(trial)
        assert candidate == trial.params and list(candidate) == list(EDGE_KEYS)
        assert space.candidate_from_params(trial.params) == candidate
        assert space.name(candidate) == to_arch_string(candidate)
    with pytest.raises(ValueError, match=r"^candidate key 'prune_ratio' is not a parameter here"):
        space.candidate_from_params(candidate | {"prune_ratio": 0.0})


def test_suggest_with_searched_compression_and_same_seed() -> None:
    space = small_space(prune_ratios=[0.0, 0.5], quant=["fp32", "int8"])

    def draw(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return [space.suggest(study.ask()) for _ in range(8)]

    first = draw(1)
    assert first == draw(1) and first != draw(2)
    assert all(list(c) == [*EDGE_KEYS, "prune_ratio", "quant"] for c in first)
    assert space.name(first[0]) == to_arch_string(first[0])
    with pytest.raises(ValueError, match=r"^candidate key 'quant' is missing"):
        space.candidate_from_params({k: v for k, v in first[0].items() if k != "quant"})


def test_networks_run_export_to_onnx_and_prune(tmp_path: Path) -> None:
    space = small_space()
    x = torch.randn(2, 3, 32, 32)
    for i, cell in enumerate([from_arch_string(ALL_NONE), *random_cells(3, seed=0)]):
        torch.manual_seed(i)
        model = space.build(cell, (3, 32, 32), 10).eval()
        with torch.no_grad():
            expected = model(x).numpy()
        assert expected.shape == (2, 10)
        path = tmp_path / f"cell{i}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[
            0
        ]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model[-1]],
    )
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    assert model(x).shape == (2, 10)


def test_same_cell_and_seed_give_identical_weights() -> None:
    cell = random_cells(1, seed=5)[0]
    states = []
    for _ in range(2):
        torch.manual_seed(9)
        states.append(small_space().build(cell, (3, 32, 32), 10).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_build_checks_candidate_and_input() -> None:
    space = NB201Space(ops=["none", "nor_conv_3x3"], C=8, N=1, prune_ratios=[0.0], quant=["fp32"])
    cell = {key: "nor_conv_3x3" for key in EDGE_KEYS}
    with pytest.raises(ValueError, match=r"^candidate edge1_0='skip_connect' is not a choice"):
        space.build(cell | {"edge1_0": "skip_connect"}, (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"^candidate key 'edge3_2' is missing"):
        space.build({k: v for k, v in cell.items() if k != "edge3_2"}, (3, 32, 32), 10)
    with pytest.raises(
        ValueError, match=r"does not fit input 30x30: .*allowed: height and width divisible by 4$"
    ):
        space.build(cell, (3, 30, 30), 10)
    assert space.build(cell | {"quant": "fp32"}, (1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ops": []}, "space.ops: [] is empty; allowed: a non-empty list of choices"),
        (
            {"ops": ["none", "conv_5x5"]},
            "space.ops: 'conv_5x5' is not an op; allowed: none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3",
        ),
        ({"C": 0}, "space.C: 0 is not a positive integer; allowed: integers >= 1"),
        ({"N": 2.5}, "space.N: 2.5 is not a positive integer; allowed: integers >= 1"),
        ({"prune_ratios": [-0.1]}, "space.prune_ratios: -0.1 is out of range; allowed: 0 <= ratio < 1"),
        ({"quant": ["fp32", "fp32"]}, "space.quant: 'fp32' is listed twice; allowed: each choice once"),
        ({"quant": ["int3"]}, "space.quant: 'int3' is not a format; allowed: fp32, fp16, int8, int4"),
    ],
)
def test_bad_kwargs_give_one_line_errors(overrides: dict, message: str) -> None:
    kwargs = dict(ops=list(OPS), C=8, N=1, prune_ratios=[0.0], quant=["fp32"]) | overrides
    with pytest.raises(ValueError) as info:
        NB201Space(**kwargs)
    assert str(info.value) == message
