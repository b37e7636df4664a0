"""Low-rank factorization (issue 13, item 4): `space.rank_ratios` -> `stage<k>.rank_ratio`.

The factorized layers compute what the originals did at ratio 1.0 (up to float error), have the rank the
formula says, leave depthwise convs, the stem and the classifier alone, still prune, and export as two Conv
nodes with the reduced shapes. A trial with the knob factorizes, fine-tunes (even unpruned) and reports it;
a sweep records the knob in trials.csv and MLflow and resumes with it; bad values are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    ROOT,
    assert_trial_runs_match,
    hwnas,
    kill_after_first_trial_then_resume,
    output_of,
)
from torch import nn

from hwnas.evaluators.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    factorize,
    factorize_conv,
    factorize_linear,
    rank_for,
)
from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.profile import count_params_macs
from hwnas.evaluators.prune import prune
from hwnas.spaces.candidate import arch_id
from hwnas.spaces.macro_cnn import MacroCNNSpace

CONF = ROOT / "conf"


def macro_space(**overrides: Any) -> MacroCNNSpace:
    conf = yaml.safe_load((CONF / "space" / "macro_cnn.yaml").read_text())
    conf.pop("_target_")
    conf.update(overrides)
    return MacroCNNSpace(**conf)


def candidate(blocks: tuple[str, ...], width: int = 32, kernel: int = 3, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"n_stages": len(blocks)}
    for i, block in enumerate(blocks, 1):
        out |= {f"stage{i}.depth": 1, f"stage{i}.width": width, f"stage{i}.kernel": kernel, f"stage{i}.block": block}
    return {**out, "prune_ratio": 0.0, "quant": "fp32", **extra}


# ---- the layers ----


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.Conv2d(16, 8, 5, stride=2, padding=2, bias=True),
        nn.Conv2d(4, 32, 1),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2),
    ],
    ids=["k3", "k5s2bias", "1x1", "dilated"],
)
def test_conv_at_ratio_one_is_the_original(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 12, 12)
    factor = factorize_conv(conv, 1.0)
    k = conv.kernel_size[0]
    rank = min(conv.in_channels * k * k, conv.out_channels)
    reduce, expand = factor
    assert reduce.weight.shape == (rank, conv.in_channels, k, k) and reduce.bias is None
    assert expand.weight.shape == (conv.out_channels, rank, 1, 1) and (expand.bias is None) == (conv.bias is None)
    assert (reduce.stride, reduce.padding, reduce.dilation) == (conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(factor(x), conv(x), atol=1e-5, rtol=1e-5)


def test_linear_at_ratio_one_is_the_original_and_truncation_is_the_svd() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 10)
    x = torch.randn(5, 24)
    torch.testing.assert_close(factorize_linear(linear, 1.0)(x), linear(x), atol=1e-5, rtol=1e-5)
    half = factorize_linear(linear, 0.5)
    assert isinstance(half, LowRankLinear) and half[0].weight.shape == (5, 24) and half[1].weight.shape == (10, 5)
    # The product is the best rank-5 approximation: its error is the discarded singular values.
    s = torch.linalg.svdvals(linear.weight.detach().double())
    err = torch.linalg.matrix_norm((half[1].weight @ half[0].weight - linear.weight).detach().double())
    assert err.item() == pytest.approx(s[5:].square().sum().sqrt().item(), rel=1e-4)


def test_rank_formula() -> None:
    assert rank_for(0.5, 27) == 14 and rank_for(0.25, 16) == 4 and rank_for(0.01, 10) == 1 and rank_for(1.0, 7) == 7
    # min(Cin*k*k, Cout): a 3x3 conv 64 -> 32 has rank <= 32
    assert factorize_conv(nn.Conv2d(64, 32, 3), 0.25)[0].out_channels == 8
    assert factorize_conv(nn.Conv2d(2, 32, 3), 0.5)[0].out_channels == 9  # Cin*k*k = 18
    for bad in (0, -0.5, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"^rank ratio: .* is out of range; allowed: a number 0 < ratio <= 1$"):
            rank_for(bad, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups=1"):
        factorize_conv(nn.Conv2d(8, 8, 3, groups=8), 0.5)


def test_what_is_factorized_in_a_macro_network() -> None:
    """Stage convs with groups 1 only: depthwise convs, the stem and the classifier stay; a 1x1 the ratio
    would not shrink too; the input model is left as it was."""
    space = macro_space(rank_ratios=[1.0, 0.5, 0.25])
    model = space.build(candidate(("conv", "dwsep", "ir3"), width=32), (3, 32, 32), 10).eval()
    before = {n: type(m) for n, m in model.named_modules()}
    ratios = space.low_rank({f"stage{i}.rank_ratio": 0.25 for i in (1, 2, 3)})
    assert ratios == {"1": 0.25, "2": 0.25, "3": 0.25}
    out, n = factorize(model, ratios)
    assert {n: type(m) for n, m in model.named_modules()} == before
    factored = {name for name, m in out.named_modules() if isinstance(m, LowRankConv2d)}
    # stage 1 conv 3x3; stage 2 dwsep: the 1x1 only; stage 3 ir3: expand 1x1 and project 1x1
    assert factored == {"1.0.0", "2.0.1.0", "3.0.body.0.0", "3.0.body.2"} and n == 4
    assert isinstance(out[0][0], nn.Conv2d) and isinstance(out[-1], nn.Linear)  # stem, classifier
    assert out[2][0][0][0].groups == 32  # depthwise untouched
    # At 0.5 the square 1x1 of dwsep (32 -> 32, r = 16: 16 * 64 = 32 * 32 weights) is not worth it.
    half, n_half = factorize(model, {"2": 0.5})
    assert n_half == 0 and half is model
    # Ratio 1.0 everywhere: nothing to do, the model itself.
    assert factorize(model, {"1": 1.0, "3": 1.0}) == (model, 0)


def test_factorized_network_prunes_and_shrinks() -> None:
    torch.manual_seed(0)
    space = macro_space(rank_ratios=[1.0, 0.5])
    model = space.build(candidate(("conv", "conv"), width=32), (3, 32, 32), 10).eval()
    x = torch.randn(1, 3, 32, 32)
    full_params, full_macs = count_params_macs(model, x)
    out, n = factorize(model, {"1": 0.5, "2": 0.5})
    params, macs = count_params_macs(out, x)
    assert n == 2 and params < full_params and macs < full_macs
    pruned = prune(out, 0.5, x)
    p_params, _ = count_params_macs(pruned, x)
    assert p_params < params and pruned(x).shape == (1, 10)
    # the r channels between the factors are pruned too
    assert pruned[1][0][0][0].out_channels < out[1][0][0][0].out_channels


def _convs(path: Path) -> dict[str, tuple[int, ...]]:
    """Conv node name -> its weight's shape."""
    graph = onnx.load(str(path)).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return {node.name: shapes[node.input[1]] for node in graph.node if node.op_type == "Conv"}


def test_exported_graph_has_the_factorized_convs(tmp_path: Path) -> None:
    space = macro_space(rank_ratios=[1.0, 0.25])
    model = space.build(candidate(("conv", "conv"), width=32, kernel=5), (3, 32, 32), 10).eval()
    x = torch.randn(1, 3, 32, 32)
    out, n = factorize(model, {"1": 1.0, "2": 0.25})
    export_onnx(model, x, tmp_path / "full.onnx", opset=17)
    export_onnx(out, x, tmp_path / "low.onnx", opset=17)
    full, low = _convs(tmp_path / "full.onnx"), _convs(tmp_path / "low.onnx")
    assert n == 1 and len(low) == len(full) + 1
    # stage 2's 5x5 conv 32 -> 32: r = round(0.25 * min(800, 32)) = 8, under the stage's module path
    stage2 = {name: shape for name, shape in low.items() if name.startswith("/2/")}
    assert sorted(stage2.values()) == [(8, 32, 5, 5), (32, 8, 1, 1)], low
    assert {k: v for k, v in low.items() if not k.startswith("/2/")} == {
        k: v for k, v in full.items() if not k.startswith("/2/")}


# ---- the space ----


def test_off_by_default_and_sampled_per_stage_when_on() -> None:
    assert yaml.safe_load((CONF / "space" / "macro_cnn.yaml").read_text())["rank_ratios"] is None
    for off in (macro_space(), macro_space(rank_ratios=[1.0])):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        c = off.suggest(trial)
        assert not [k for k in c if k.endswith(".rank_ratio")] and off.low_rank(c) == {}
        assert not [k for k in off.decisions() if k.endswith(".rank_ratio")]
        with pytest.raises(ValueError, match=r"^candidate key 'stage1.rank_ratio' is not a parameter here"):
            off.candidate_from_params({**c, "stage1.rank_ratio": 0.5})
    space = macro_space(rank_ratios=[1.0, 0.5, 0.25])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        c = space.suggest(trial)
        n = c["n_stages"]
        assert [k for k in c if k.endswith(".rank_ratio")] == [f"stage{i}.rank_ratio" for i in range(1, n + 1)]
        assert space.candidate_from_params(trial.params) == c
        seen |= {c[f"stage{i}.rank_ratio"] for i in range(1, n + 1)}
        # the network and its name ignore the knob; the candidate's id does not
        plain = {k: v for k, v in c.items() if not k.endswith(".rank_ratio")}
        assert space.name(c) == space.name(plain) and space.architecture(c) == space.architecture(plain)
        assert arch_id(c) != arch_id(plain)
    assert seen == {1.0, 0.5, 0.25}
    with pytest.raises(ValueError, match=r"^candidate stage1.rank_ratio=0.3 is not a choice; allowed: \[1.0, 0.5, 0.25\]"):
        space.candidate_from_params({**candidate(("conv", "conv")), "stage1.rank_ratio": 0.3, "stage2.rank_ratio": 1.0})
    with pytest.raises(ValueError, match=r"^candidate key 'stage1.rank_ratio' is missing"):
        space.candidate_from_params(candidate(("conv", "conv")))


@pytest.mark.parametrize(
    "value, message",
    [
        ([0.0], "space.rank_ratios: 0.0 is out of range; allowed: 0 < ratio <= 1"),
        ([1.0, 1.5], "space.rank_ratios: 1.5 is out of range; allowed: 0 < ratio <= 1"),
        ([True], "space.rank_ratios: True is not a number; allowed: 0 < ratio <= 1"),
        (["half"], "space.rank_ratios: 'half' is not a number; allowed: 0 < ratio <= 1"),
        ([], "space.rank_ratios: [] is empty; allowed: a non-empty list of choices"),
        ([0.5, 0.5], "space.rank_ratios: 0.5 is listed twice; allowed: each choice once"),
        (0.5, "space.rank_ratios: 0.5 is not a list; allowed: a non-empty list of choices"),
    ],
)
def test_bad_rank_ratios_refused_in_one_line(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        macro_space(rank_ratios=value)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ---- a trial, and a sweep through the CLI ----


def test_trial_factorizes_fine_tunes_and_reports(tmp_path: Path) -> None:
    from test_pipeline import make_evaluator

    space = macro_space(n_stages=[1, 2], rank_ratios=[1.0, 0.25])
    evaluator = make_evaluator(space=space, epochs=2, finetune_epochs=1)
    base = candidate(("conv", "conv"), width=32)
    full = evaluator.evaluate({**base, "stage1.rank_ratio": 1.0, "stage2.rank_ratio": 1.0}, tmp_path / "full")
    low = evaluator.evaluate({**base, "stage1.rank_ratio": 0.25, "stage2.rank_ratio": 0.25}, tmp_path / "low")
    assert full.metrics["lowrank_layers"] == 0.0 and full.metrics["finetune_s"] == 0.0
    assert low.metrics["lowrank_layers"] == 2.0
    assert low.metrics["factorize_s"] > 0 and low.metrics["finetune_s"] > 0  # fine-tuned though unpruned
    assert low.metrics["params"] < full.metrics["params"] and low.metrics["macs"] < full.metrics["macs"]
    assert len(_convs(Path(low.artifact))) == len(_convs(Path(full.artifact))) + 2
    assert low.metrics["val_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert set(low.metrics) <= evaluator.metric_names
    # Without the knob (another space): no lowrank_layers column, factorize_s 0.
    plain = make_evaluator(space=macro_space(n_stages=[1, 2]), epochs=1).evaluate(base, tmp_path / "plain")
    assert "lowrank_layers" not in plain.metrics and plain.metrics["factorize_s"] == 0.0
    # Final training fine-tunes a factorized candidate too.
    final = evaluator.retrain({**base, "stage1.rank_ratio": 0.25, "stage2.rank_ratio": 1.0}, tmp_path / "final", epochs=1)
    assert final.info["finetune_epochs"] == 1 and final.metrics["lowrank_layers"] == 1.0


def test_bad_rank_ratios_refused_through_the_cli(tmp_path: Path) -> None:
    proc = hwnas("experiment=compress_all", "runner=local", "tracking.enabled=false", "space.rank_ratios=[1.0,2]",
                 f"run_dir={tmp_path / 'run'}", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, output_of(proc)
    assert len(lines) == 1 and lines[0].startswith("hwnas: error: space.rank_ratios: 2 is out of range"), proc.stderr


def test_sweep_records_the_knob_and_resumes_with_it(tmp_path: Path) -> None:
    """experiment=compress_all, every stage at 0.5 or 0.25: stage<k>.rank_ratio in trials.csv and in each
    MLflow child run's params, lowrank_layers among the metrics; killed after its first trial and resumed,
    the sweep finishes with the knob, the trials recorded before the kill unchanged."""
    n = 3
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["experiment=compress_all", "runner=local", f"n_trials={n}", f"run_dir={run_dir}", f"tracking.uri={uri}",
            f"hardware.cache={tmp_path / 'latency.sqlite'}", "space.rank_ratios=[0.5,0.25]", "space.widths=[16]",
            "space.blocks=[conv]"]
    before, rows = kill_after_first_trial_then_resume(args, run_dir, n)

    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and (trials["status"] == "COMPLETE").all(), trials
    assert "stage1.rank_ratio" in trials.columns
    for _, row in trials.iterrows():
        for i in range(1, int(row["n_stages"]) + 1):
            assert row[f"stage{i}.rank_ratio"] in (0.5, 0.25)
    assert all(r["metrics"]["lowrank_layers"] >= 1 for r in rows), rows
    assert_trial_runs_match(uri, "hwnas-compress_all", rows, params=["stage1.rank_ratio"], metrics=["lowrank_layers"])
