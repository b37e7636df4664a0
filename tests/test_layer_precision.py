"""Per-stage precision (issue 13, item 1): `space.stage_precision`.

With the knob on, every int8 candidate of the macro-CNN space samples `stage<k>.precision` in
[fp32, int8] per stage; the int8 compressor keeps the fp32 stages' nodes float (the stem conv and the
classifier stay float as always). Checked where it acts: the exported ONNX file (convolutions whose
weight comes from a DequantizeLinear, per stage, and the QLinearConv kernels ONNX Runtime's CPU EP
runs), the candidate's identity, trials.csv and MLflow, and the one-line refusals.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, hwnas, mlflow_runs, output_of, read_jsonl

from hwnas.evaluators.onnx_export import export_onnx
from hwnas.evaluators.quantize import compress_onnx
from hwnas.spaces.candidate import arch_id, is_compression_key, net_id
from hwnas.spaces.macro_cnn import MacroCNNSpace

CONF = ROOT / "conf"
# Three stages of the three block kinds: ir (with a residual Add), dwsep (depthwise + pointwise), conv.
THREE = {
    "n_stages": 3,
    "stage1.depth": 2, "stage1.width": 16, "stage1.kernel": 3, "stage1.block": "ir3",
    "stage2.depth": 2, "stage2.width": 24, "stage2.kernel": 3, "stage2.block": "dwsep",
    "stage3.depth": 2, "stage3.width": 32, "stage3.kernel": 3, "stage3.block": "conv",
    "prune_ratio": 0.0, "quant": "int8",
}
# Conv nodes per child of the built network: stem 1, stage1 2 ir blocks x 3, stage2 2 x 2, stage3 2 x 1.
CONVS = {"0": 1, "1": 6, "2": 4, "3": 2}


def macro_space(**overrides: Any) -> MacroCNNSpace:
    conf = yaml.safe_load((CONF / "space" / "macro_cnn.yaml").read_text())
    conf.pop("_target_")
    conf.update(overrides)
    return MacroCNNSpace(**conf)


def with_precision(*precisions: str) -> dict[str, Any]:
    return {**THREE, **{f"stage{i}.precision": p for i, p in enumerate(precisions, start=1)}}


def child(name: str) -> str:
    """The top-level child of the torch model a node was exported from ("/2/2.0/.../Conv" -> "2")."""
    return name.split("/")[1] if name.startswith("/") else ""


def quantized_convs(path: Path) -> tuple[Counter, Counter]:
    """(int8 convolutions, float convolutions) per child in the QDQ file: a Conv/Gemm whose weight
    comes from a DequantizeLinear computes in int8 once ORT fuses it, one with a float weight does not."""
    graph = onnx.load(str(path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    int8, fp32 = Counter(), Counter()
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm"):
            src = producer.get(n.input[1])
            (int8 if src is not None and src.op_type == "DequantizeLinear" else fp32)[child(n.name)] += 1
    return int8, fp32


def ort_kernels(path: Path, tmp: Path) -> Counter:
    """(child, op type) of the convolutions and pooling ONNX Runtime's CPU EP runs after its fusions."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / f"{path.stem}.ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return Counter((child(n.name), n.op_type) for n in graph.node if "Conv" in n.op_type or "Pool" in n.op_type)


# ---- the space (no torch) ----


def test_off_by_default_and_nothing_changes() -> None:
    assert yaml.safe_load((CONF / "space" / "macro_cnn.yaml").read_text())["stage_precision"] is False
    space = macro_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        candidate = space.suggest(study.ask())
        assert not [k for k in candidate if k.endswith(".precision")]
        assert space.float_modules(candidate) == []
    assert not [k for k in space.decisions() if k.endswith(".precision")]


def test_int8_candidates_sample_a_precision_per_active_stage() -> None:
    space = macro_space(stage_precision=True, n_stages=[1, 2, 3])
    decisions = space.decisions()
    assert {k: v for k, v in decisions.items() if k.endswith(".precision")} == {
        f"stage{i}.precision": ["fp32", "int8"] for i in (1, 2, 3)
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = Counter()
    for _ in range(60):
        trial = study.ask()
        candidate = space.suggest(trial)
        assert candidate == trial.params and space.candidate_from_params(trial.params) == candidate
        keys = [k for k in candidate if k.endswith(".precision")]
        if candidate["quant"] == "int8":
            assert keys == [f"stage{i}.precision" for i in range(1, candidate["n_stages"] + 1)]
            seen.update(candidate[k] for k in keys)
        else:  # conditional: an fp32 candidate has no per-stage precision
            assert keys == []
        study.tell(trial, 0.0)
    assert seen["fp32"] and seen["int8"]


def test_candidate_checks() -> None:
    space = macro_space(stage_precision=True, n_stages=[1, 2, 3], widths=[16, 24, 32], blocks=["conv", "dwsep", "ir"],
                        expansions=[3])
    good = with_precision("int8", "fp32", "int8")
    assert space.candidate_from_params(good) == good
    with pytest.raises(ValueError, match=r"^candidate key 'stage3.precision' is missing; required: .*stage3.precision$"):
        space.candidate_from_params(with_precision("int8", "fp32"))
    with pytest.raises(ValueError, match=r"^candidate stage2.precision='int4' is not a choice; allowed: \['fp32', 'int8'\]$"):
        space.candidate_from_params(with_precision("int8", "int4", "int8"))
    as_fp32 = {**with_precision("int8", "fp32", "int8"), "quant": "fp32"}
    with pytest.raises(ValueError, match=r"^candidate key 'stage1.precision' is not a parameter here; allowed: "):
        space.candidate_from_params(as_fp32)


def test_identity_precision_is_compression() -> None:
    """net_id pairs every precision mix of one network with its fp32 version (the evaluator's seed comes
    from net_id, so all of them quantize the same trained weights); arch_id tells them apart."""
    space = macro_space(stage_precision=True, n_stages=[3], widths=[16, 24, 32], expansions=[3])
    mixes = [with_precision(*p) for p in (("int8",) * 3, ("fp32", "int8", "fp32"), ("fp32",) * 3)]
    fp32 = {**THREE, "quant": "fp32"}
    assert len({net_id(c) for c in [*mixes, fp32]}) == 1
    assert len({arch_id(c) for c in [*mixes, fp32]}) == 4
    assert all(space.architecture(c) == space.architecture(fp32) for c in mixes)
    assert space.name(mixes[1]) == space.name(fp32)
    assert is_compression_key("stage2.precision") and is_compression_key("stage12.rank_ratio")
    assert not is_compression_key("stage2.width") and not is_compression_key("precision")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stage_precision": "yes"}, "space.stage_precision: 'yes' is not a boolean; allowed: true, false"),
        ({"stage_precision": True, "quant": ["fp32", "fp16"]},
         "space.stage_precision: true needs int8 among space.quant (fp32, fp16): the stages choose between fp32 "
         "and int8 only in int8 candidates; allowed: false, or add int8 to space.quant"),
    ],
)
def test_bad_config_refused_in_one_line(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        macro_space(**overrides)
    assert str(info.value) == message


def test_float_modules_names_stages_and_the_tail_after_a_float_last_stage() -> None:
    space = macro_space(stage_precision=True)
    assert space.float_modules(with_precision("int8", "int8", "int8")) == []
    assert space.float_modules(with_precision("fp32", "int8", "int8")) == ["1"]
    # the last stage float: its pooling (child 4) and flatten (child 5) stay float with it
    assert space.float_modules(with_precision("int8", "int8", "fp32")) == ["3", "4", "5"]
    assert space.float_modules({**with_precision("fp32", "fp32", "fp32"), "quant": "fp32"}) == []


# ---- the exported file holds exactly the mix ----


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MacroCNNSpace, Path, np.ndarray]:
    space = macro_space(stage_precision=True, n_stages=[3], widths=[16, 24, 32], expansions=[3])
    torch.manual_seed(0)
    model = space.build(THREE, (3, 32, 32), 10).eval()
    d = tmp_path_factory.mktemp("precision")
    fp32 = export_onnx(model, torch.zeros(1, 3, 32, 32), d / "fp32.onnx", opset=17)
    calibration = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    return space, fp32, calibration


@pytest.mark.parametrize(
    "precisions",
    [("int8", "int8", "int8"), ("int8", "fp32", "int8"), ("fp32", "int8", "fp32"), ("fp32", "fp32", "int8"),
     ("fp32", "fp32", "fp32")],
)
def test_the_file_carries_exactly_the_mix(exported, precisions: tuple[str, ...], tmp_path: Path) -> None:
    space, fp32, calibration = exported
    candidate = with_precision(*precisions)
    out = compress_onnx(fp32, "int8", calibration, tmp_path / "int8.onnx", keep_float=space.float_modules(candidate))
    int8, floats = quantized_convs(out)
    kernels = ort_kernels(out, tmp_path)
    for k, precision in enumerate(precisions, start=1):
        stage = str(k)
        if precision == "int8":  # every conv of the stage int8 in the file and an integer kernel in ORT
            assert (int8[stage], floats[stage]) == (CONVS[stage], 0), (stage, int8, floats)
            assert kernels[(stage, "QLinearConv")] == CONVS[stage], kernels
        else:  # none of them
            assert (int8[stage], floats[stage]) == (0, CONVS[stage]), (stage, int8, floats)
            assert kernels[(stage, "QLinearConv")] == 0, kernels
    # pinned float as always: the stem conv (child 0) and the classifier (child 6)
    assert (int8["0"], floats["0"], int8["6"], floats["6"]) == (0, 1, 0, 1)
    # the pooling after the last stage follows that stage: integer pooling only after an int8 stage
    assert kernels[("4", "QLinearGlobalAveragePool")] == (precisions[-1] == "int8")
    nodes = onnx.load(str(out)).graph.node
    if all(p == "fp32" for p in precisions):  # nothing left to quantize: a float file
        assert not [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # ONNX Runtime runs it, and the outputs are close to the float file's
    x = calibration[:8]
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 0.25 * np.abs(want).max() + 1e-3


def test_factorized_and_pruned_stages_keep_their_scope(tmp_path: Path) -> None:
    """Low-rank factorization (a conv becomes two) and pruning run before export: the stage's nodes are
    still under its scope, so its precision still covers every one of them."""
    from hwnas.evaluators.lowrank import factorize
    from hwnas.evaluators.prune import prune

    space = macro_space(stage_precision=True, n_stages=[3], widths=[16, 24, 32], expansions=[3])
    torch.manual_seed(0)
    example = torch.zeros(1, 3, 32, 32)
    model, factorized = factorize(space.build(THREE, (3, 32, 32), 10).eval(), {"1": 0.5, "2": 0.5, "3": 0.5})
    assert factorized > 0
    model = prune(model, 0.5, example).eval()
    fp32 = export_onnx(model, example, tmp_path / "fp32.onnx", opset=17)
    calibration = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    for precisions in (("int8", "fp32", "int8"), ("fp32", "int8", "fp32")):
        candidate = with_precision(*precisions)
        out = compress_onnx(fp32, "int8", calibration, tmp_path / "int8.onnx", keep_float=space.float_modules(candidate))
        int8, floats = quantized_convs(out)
        kernels = ort_kernels(out, tmp_path)
        for k, precision in enumerate(precisions, start=1):
            stage = str(k)
            convs = int8[stage] + floats[stage]
            assert convs > CONVS[stage] or stage == "2"  # stage 2's pointwise convs do not shrink at 0.5
            assert (int8[stage], kernels[(stage, "QLinearConv")]) == ((convs, convs) if precision == "int8" else (0, 0))


def test_keep_float_refusals(exported, tmp_path: Path) -> None:
    _, fp32, calibration = exported
    with pytest.raises(ValueError, match=r"^keep_float: module '9' has no node in the exported graph \(none named /9/\.\.\.\); "
                                         r"allowed: 0, 1, 2, 3, 4, 5, 6$"):
        compress_onnx(fp32, "int8", calibration, tmp_path / "a.onnx", keep_float=["9"])
    with pytest.raises(ValueError, match=r"^keep_float: '2.0' is not a top-level module name; allowed: "):
        compress_onnx(fp32, "int8", calibration, tmp_path / "b.onnx", keep_float=["2.0"])
    with pytest.raises(ValueError, match=r"^keep_float: \['2'\] given with quant='fp32'; allowed: only with quant='int8'$"):
        compress_onnx(fp32, "fp32", calibration, tmp_path / "c.onnx", keep_float=["2"])


# ---- through the CLI: a sweep records the knob, and the trial files hold what it says ----


def test_sweep_records_the_precisions_and_each_file_holds_its_mix(tmp_path: Path) -> None:
    run_dir, uri = tmp_path / "exp" / "run", f"sqlite:///{tmp_path}/mlflow.db"
    args = ("experiment=smoke", "runner=local", "n_trials=4", "space.n_stages=[2]", "space.quant=[int8]",
            "space.stage_precision=true", "evaluator.epochs=1", "evaluator.finetune_epochs=0",
            "hardware.repeats=5", f"run_dir={run_dir}", f"tracking.uri={uri}")
    proc = hwnas(*args, timeout=600)
    assert proc.returncode == 0, output_of(proc)
    rows = read_jsonl(run_dir / "trials.jsonl")
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(rows) == len(trials) == 4 and (trials["status"] == "COMPLETE").all()
    assert {"stage1.precision", "stage2.precision"} <= set(trials.columns)
    assert trials["stage1.precision"].isin(["fp32", "int8"]).all()
    for row in rows:
        candidate = row["candidate"]
        int8, floats = quantized_convs(run_dir / row["artifact"])
        for k in (1, 2):
            stage = str(k)
            if candidate[f"stage{k}.precision"] == "int8":
                assert int8[stage] > 0 and floats[stage] == 0, (candidate, int8, floats)
            else:
                assert int8[stage] == 0 and floats[stage] > 0, (candidate, int8, floats)
    _, children = mlflow_runs(uri, "hwnas-smoke")
    assert len(children) == 4
    by_number = {r["number"]: r for r in rows}
    for c in children:
        candidate = by_number[int(c.data.tags["trial"])]["candidate"]
        assert c.data.params["stage1.precision"] == candidate["stage1.precision"]
        assert c.data.params["stage2.precision"] == candidate["stage2.precision"]

    # Resume: the same config resumes (nothing left to run, rows kept); turning the knob off is a change.
    again = hwnas(*args, "resume=true", timeout=300)
    assert again.returncode == 0, output_of(again)
    assert read_jsonl(run_dir / "trials.jsonl") == rows
    off = hwnas(*args, "resume=true", "space.stage_precision=false", timeout=300)
    assert off.returncode == 2, output_of(off)
    assert "space.stage_precision" in off.stderr.strip().splitlines()[-1]


def test_cli_refuses_the_knob_without_int8_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp" / "run"
    proc = hwnas("experiment=smoke", "runner=local", "space.quant=[fp32]", "space.stage_precision=true",
                 f"run_dir={run_dir}", "tracking.enabled=false")
    assert proc.returncode == 2, output_of(proc)
    line = proc.stderr.strip().splitlines()[-1]
    assert "space.stage_precision" in line and "allowed:" in line and "int8" in line
    assert not (tmp_path / "exp").exists()
