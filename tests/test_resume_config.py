"""Resuming a run folder made before a knob existed: the knob, off, does not count as a change."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hwnas.search.config import ConfigError
from hwnas.search.experiment import CONFIG_FILE, prepare_run_dir
from hwnas.search.launch import compose
from hwnas.search.sweep_state import SweepState


def _older_run(run_dir: Path) -> None:
    """A run folder as a version of hwnas without warm starts and init_from wrote it."""
    saved = OmegaConf.to_container(compose(["experiment=smoke", f"run_dir={run_dir}"]), resolve=True)
    assert isinstance(saved, dict)
    del saved["warm_start"], saved["evaluator"]["init_from"], saved["evaluator"]["init_strict"]
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    SweepState(study_name="smoke", parent_run_id=None).save(run_dir)


def test_a_run_that_predates_a_knob_resumes_with_it_off(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _older_run(run_dir)
    assert prepare_run_dir(compose(["experiment=smoke", f"run_dir={run_dir}", "resume=true"])) == run_dir


def test_turning_on_a_knob_the_run_predates_is_a_change(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _older_run(run_dir)
    with pytest.raises(ConfigError, match=r"differs from the original run in evaluator\.init_strict$|init_strict;"):
        prepare_run_dir(compose(["experiment=smoke", f"run_dir={run_dir}", "resume=true", "evaluator.init_strict=true"]))
