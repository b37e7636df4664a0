"""Bad config gives one line on stderr and exit status 2, before anything starts or is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, hwnas, nvidia_gpu_present, ort_has_cuda, torch_has_cuda

BAD = [
    (["foo=1"], "foo"),
    (["space.prune_ratios=[1.5]"], "space.prune_ratios"),
    (["space.quant=[int3]"], "space.quant"),
    (["n_trials=0"], "n_trials"),
    (["search=annealing"], "search=annealing"),
    (["runner.max_concurrent=0"], "runner.max_concurrent"),
    (["objective.latency_budget_ms=-1"], "objective.latency_budget_ms"),
    (["hardware.provider=gpu"], "hardware"),
    (["hardware=cuda"], "CUDAExecutionProvider"),
    (["select.rule=pareto"], "select.rule"),
    (["space.widths=[0,8]"], "space.widths"),
    (["evaluator.optimizer=lbfgs"], "optimizer"),
    (["+space.colour=red"], "space.colour"),
    (["objective.metrics=[{name: val_accuracy, mode: up}]"], "objective.metrics[0].mode"),
    (["objective.metrics=[{name: flops, mode: min}]"], "objective.metrics[0].name"),
]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return hwnas(*args, timeout=120)  # from the repository root, in its own interpreter


# Refused only where this machine cannot run it: on one with the CUDA build of onnxruntime it is valid.
NEEDS_NO_CUDA = {"hardware=cuda": "this onnxruntime has the CUDA EP: hardware=cuda is valid here"}


def _case(args: list[str], named: str) -> object:
    reason = NEEDS_NO_CUDA.get(args[0])
    marks = [pytest.mark.skipif(ort_has_cuda(), reason=reason)] if reason else []
    return pytest.param(args, named, id=args[0], marks=marks)


@pytest.mark.parametrize(("args", "named"), [_case(a, n) for a, n in BAD])
def test_bad_value_one_line_exit_2_nothing_written(tmp_path: Path, args: list[str], named: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*args, f"run_dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert named in lines[0]
    assert "allowed" in lines[0] or "available" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()
    assert not (tmp_path / "m.db").exists()


@pytest.mark.slow  # starts a local Ray (about 8 s on two idle cores) to count its GPUs
@pytest.mark.skipif(nvidia_gpu_present(), reason="this machine has a GPU: Ray can give a trial one")
def test_gpu_per_trial_without_a_gpu_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # Checked against the Ray cluster the sweep joins (a fresh local one here), before any file is written.
    run_dir = tmp_path / "run"
    proc = run_cli(["runner.resources.gpu=1", f"run_dir={run_dir}", "tracking.enabled=false"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hwnas: error: runner.resources.gpu"), proc.stderr
    assert "has 0 GPUs" in lines[0] and "allowed" in lines[0]
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.skipif(not (nvidia_gpu_present() and torch_has_cuda()), reason="needs a GPU that Ray and torch see")
def test_gpu_per_trial_and_cuda_training_run_where_there_is_a_gpu(tmp_path: Path) -> None:
    # The positive counterpart of the refusals above: on a GPU machine the same settings run.
    run_dir = tmp_path / "run"
    proc = run_cli(["experiment=smoke", "n_trials=2", "runner.resources.gpu=0.5", "evaluator.accelerator=cuda",
                    f"run_dir={run_dir}", "tracking.enabled=false"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = (run_dir / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and all(",COMPLETE," in t for t in trials[1:]), trials


def test_existing_run_dir_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trials.jsonl").write_text("{}\n")
    proc = run_cli([f"run_dir={run_dir}"])
    assert proc.returncode == 2
    assert "run_dir" in proc.stderr
    assert (run_dir / "trials.jsonl").read_text() == "{}\n"  # nothing already computed is touched


def test_help_lists_groups() -> None:
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for group in ("space", "search", "runner", "hardware"):
        assert group in proc.stdout


HEAVY = ("torch", "pytorch_lightning", "lightning_fabric", "sklearn", "mlflow", "matplotlib", "ray.tune")


def test_validating_and_building_the_default_experiment_imports_none_of_the_heavy_libraries():
    # The driver validates the config and builds (and later pickles) the evaluator before Ray starts;
    # torch, Lightning and scikit-learn are the workers' business, Ray Tune and MLflow are imported
    # while Ray starts. Each of these costs seconds of start-up on two cores. A fresh interpreter.
    code = (
        "import sys\n"
        "from hwnas.search.config import compose_config, validate\n"
        "from hwnas.search.experiment import build_experiment\n"
        "cfg = compose_config(['run_dir=unused']); validate(cfg); build_experiment(cfg)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
