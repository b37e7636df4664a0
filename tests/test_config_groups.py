"""Every choice of every config group composes, validates and builds (nothing is trained here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ort_has_cuda
from omegaconf import OmegaConf

from hwnas.search.config import GROUPS, ConfigError, compose_config, group_choices, validate
from hwnas.search.experiment import build_experiment

# Choices that need something this machine or this test does not have; each must fail cleanly.
NEEDS = {
    ("evaluator", "tabular"): "evaluator.table",  # a table the user passes by path
}
if not ort_has_cuda():  # the CPU build of ONNX Runtime; with the CUDA build, hardware=cuda builds like the rest
    NEEDS[("hardware", "cuda")] = "CUDAExecutionProvider"
CASES = [(g, c) for g in GROUPS for c in group_choices(g)] + [("experiment", c) for c in group_choices("experiment")]


@pytest.mark.parametrize(("group", "choice"), CASES, ids=[f"{g}={c}" for g, c in CASES])
def test_every_choice_builds(group: str, choice: str, tmp_path: Path) -> None:
    overrides = [f"{group}={choice}", f"run_dir={tmp_path / 'run'}"]
    if (group, choice) in NEEDS:
        with pytest.raises(ConfigError, match=NEEDS[(group, choice)]):
            cfg = compose_config(overrides)
            validate(cfg)
            build_experiment(cfg)
        return
    cfg = compose_config(overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # e.g. a table the user passes by path: refused, naming the key
        with pytest.raises(ConfigError, match=missing[0].replace(".", r"\.")):
            validate(cfg)
        return
    validate(cfg)
    built = build_experiment(cfg)
    assert built.sweep.n_trials == cfg.n_trials
    assert not (tmp_path / "run").exists()  # building writes nothing
