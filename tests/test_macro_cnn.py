from __future__ import annotations

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
from hwnas.spaces.candidate import arch_id
from hwnas.spaces.macro_cnn import MacroCNNSpace

CONF = Path(__file__).resolve().parents[1] / "conf" / "space" / "macro_cnn.yaml"
KWARGS = dict(
    n_stages=[1, 2, 3, 4],
    depths=[1, 2],
    widths=[8, 16, 24],
    kernels=[3, 5],
    blocks=["conv", "dwsep", "ir"],
    expansions=[1, 3, 6],
    stem_width=8,
    stem_stride=1,
    prune_ratios=[0.0, 0.5],
    quant=["fp32", "int8"],
)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_space(**overrides: object) -> MacroCNNSpace:
    return MacroCNNSpace(**{**KWARGS, **overrides})


def uniform_candidate(n_stages: int, block: str, depth: int = 2, kernel: int = 3) -> dict:
    candidate: dict = {"n_stages": n_stages}
    for i in range(1, n_stages + 1):
        candidate |= {
            f"stage{i}.depth": depth,
            f"stage{i}.width": [8, 16, 24][(i - 1) % 3],
            f"stage{i}.kernel": kernel,
            f"stage{i}.block": block,
        }
    return candidate | {"prune_ratio": 0.5, "quant": "int8"}


def run_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def sample(space: MacroCNNSpace, seed: int, n: int) -> list[tuple[dict, dict]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((space.suggest(trial), dict(trial.params)))
    return out


def test_default_config_instantiates_and_is_a_search_space() -> None:
    space = hydra.utils.instantiate(OmegaConf.load(CONF))
    assert isinstance(space, MacroCNNSpace)
    assert isinstance(space, SearchSpace)
    assert space.decisions()["stage1.block"] == ["conv", "dwsep", "ir1", "ir3", "ir6"]
    assert space.decisions()["prune_ratio"] == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize(
    ("n_stages", "block"),
    [(2, "conv"), (2, "dwsep"), (2, "ir1"), (2, "ir3"), (2, "ir6"), (1, "ir6"), (3, "conv"), (4, "ir3")],
)
def test_builds_runs_and_exports_to_onnx(tmp_path: Path, n_stages: int, block: str) -> None:
    model = make_space().build(uniform_candidate(n_stages, block), (3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    assert expected.shape == (2, 10)
    np.testing.assert_allclose(run_onnx(model, x, tmp_path / "m.onnx"), expected, rtol=1e-4, atol=1e-4)


def test_default_space_random_candidates_build() -> None:
    space = hydra.utils.instantiate(OmegaConf.load(CONF))
    x = torch.randn(2, 3, 32, 32)
    candidates = [c for c, _ in sample(space, seed=3, n=12)]
    assert {c["n_stages"] for c in candidates} == {2, 3, 4}
    for candidate in candidates:
        with torch.no_grad():
            assert space.build(candidate, (3, 32, 32), 7)(x).shape == (2, 7)


def test_grayscale_input_and_stride_per_stage() -> None:
    model = make_space().build(uniform_candidate(3, "conv", depth=1), (1, 32, 32), 4)
    features = model[:-3](torch.randn(2, 1, 32, 32))  # stem + stages, before pool/flatten/linear
    assert features.shape == (2, 24, 4, 4)


def test_suggest_equals_trial_params_with_only_active_stages() -> None:
    space = make_space()
    pairs = sample(space, seed=0, n=30)
    counts = set()
    for candidate, params in pairs:
        assert candidate == params
        n = candidate["n_stages"]
        counts.add(n)
        assert set(candidate) == {"n_stages", "prune_ratio", "quant", *space.stage_keys(n)}
        assert set(candidate) <= set(space.decisions())
        assert all(candidate[k] in space.decisions()[k] for k in candidate)
        assert space.candidate_from_params(params) == candidate
    assert counts == {1, 2, 3, 4}


def test_same_seed_same_candidates_other_seed_others() -> None:
    space = make_space()
    first = [c for c, _ in sample(space, seed=7, n=10)]
    assert first == [c for c, _ in sample(space, seed=7, n=10)]
    assert first != [c for c, _ in sample(space, seed=8, n=10)]


def test_same_candidate_and_seed_give_identical_weights() -> None:
    space = make_space()
    candidate = uniform_candidate(3, "ir6")
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(space.build(candidate, (3, 32, 32), 10).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(124)
    other = space.build(candidate, (3, 32, 32), 10).state_dict()
    assert not all(torch.equal(states[0][k], other[k]) for k in other)


def test_arch_id_is_stable() -> None:
    candidate = uniform_candidate(2, "dwsep")
    shuffled = dict(reversed(list(candidate.items())))
    # A hard-coded value: ids name caches and MLflow runs, so they must not drift between releases.
    assert arch_id(candidate) == arch_id(shuffled) == "dcf49df351d0"


def test_candidate_from_params_canonicalises_and_rejects() -> None:
    space = make_space()
    params = uniform_candidate(1, "conv") | {"prune_ratio": 0}
    candidate = space.candidate_from_params(params)
    assert candidate["prune_ratio"] == 0.0 and isinstance(candidate["prune_ratio"], float)
    with pytest.raises(ValueError, match=r"^candidate key 'stage2.depth' is not a parameter here"):
        space.candidate_from_params(params | {"stage2.depth": 1})
    with pytest.raises(ValueError, match=r"^candidate key 'quant' is missing"):
        space.candidate_from_params({k: v for k, v in params.items() if k != "quant"})
    with pytest.raises(ValueError, match=r"^candidate stage1.block='ir2' is not a choice"):
        space.candidate_from_params(params | {"stage1.block": "ir2"})


def test_build_ignores_compression_but_checks_the_architecture() -> None:
    space = make_space()
    arch = {k: v for k, v in uniform_candidate(2, "conv").items() if k not in ("prune_ratio", "quant")}
    torch.manual_seed(0)
    a = space.build(arch, (3, 32, 32), 10).state_dict()
    torch.manual_seed(0)
    b = space.build(uniform_candidate(2, "conv"), (3, 32, 32), 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"^candidate key 'stage1.width' is missing"):
        space.build({k: v for k, v in arch.items() if k != "stage1.width"}, (3, 32, 32), 10)


def test_too_small_input_is_a_clear_error() -> None:
    candidate = uniform_candidate(4, "conv")
    with pytest.raises(
        ValueError, match=rf"^candidate {arch_id(candidate)} \(n_stages=4\) does not fit input 8x8"
    ):
        make_space().build(candidate, (1, 8, 8), 10)
    assert make_space().build(candidate, (1, 16, 16), 10)(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_blocks_are_prunable_with_torch_pruning() -> None:
    model = make_space().build(uniform_candidate(3, "ir6"), (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_stages": []}, "space.n_stages: [] is empty; allowed: a non-empty list of choices"),
        ({"n_stages": [0, 2]}, "space.n_stages: 0 is out of range; allowed: integers 1..6"),
        ({"n_stages": [7]}, "space.n_stages: 7 is out of range; allowed: integers 1..6"),
        ({"n_stages": 3}, "space.n_stages: 3 is not a list; allowed: a non-empty list of choices"),
        ({"depths": [1, 1]}, "space.depths: 1 is listed twice; allowed: each choice once"),
        ({"depths": [True]}, "space.depths: True is not an integer; allowed: integers >= 1"),
        ({"widths": [16, 0]}, "space.widths: 0 is out of range; allowed: integers >= 1"),
        ({"widths": [16.5]}, "space.widths: 16.5 is not an integer; allowed: integers >= 1"),
        ({"kernels": [3, 4]}, "space.kernels: 4 is even; allowed: odd sizes (same padding)"),
        ({"blocks": ["conv", "mbconv"]}, "space.blocks: 'mbconv' is not a block; allowed: conv, dwsep, ir"),
        ({"blocks": "conv"}, "space.blocks: 'conv' is not a list; allowed: a non-empty list of choices"),
        ({"expansions": [0]}, "space.expansions: 0 is out of range; allowed: integers >= 1"),
        ({"stem_width": 0}, "space.stem_width: 0 is not a positive integer; allowed: integers >= 1"),
        ({"stem_stride": 3}, "space.stem_stride: 3 is not allowed; allowed: 1, 2"),
        ({"prune_ratios": [0.0, 1.5]}, "space.prune_ratios: 1.5 is out of range; allowed: 0 <= ratio < 1"),
        ({"prune_ratios": [1]}, "space.prune_ratios: 1 is out of range; allowed: 0 <= ratio < 1"),
        ({"prune_ratios": ["0.5"]}, "space.prune_ratios: '0.5' is not a number; allowed: 0 <= ratio < 1"),
        ({"quant": ["int3"]}, "space.quant: 'int3' is not a format; allowed: fp32, fp16, int8, int4"),
        ({"quant": []}, "space.quant: [] is empty; allowed: a non-empty list of choices"),
    ],
)
def test_bad_kwargs_give_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make_space(**overrides)
    assert str(info.value) == message
