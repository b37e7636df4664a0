"""What a runner is given: everything a sweep needs, already built and validated."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from hwnas.evaluators.base import Evaluator
from hwnas.search.objectives import Objectives
from hwnas.search.sweep_state import journal_storage
from hwnas.spaces.base import SearchSpace


@dataclass
class Sweep:
    space: SearchSpace
    sampler: optuna.samplers.BaseSampler
    evaluator: Evaluator
    objectives: Objectives
    n_trials: int  # distinct candidates evaluated; read by the broker only
    run_dir: Path
    study_name: str
    scheduler: Any = None  # search/schedulers/: rung decisions and latency-first (None: every trial in full)

    def trial_dir(self, number: int) -> Path:
        return self.run_dir / "trials" / f"{number:04d}"

    def create_study(self) -> optuna.Study:
        """The sweep's study (Optuna's journal in run_dir), loaded with its whole history when resumed."""
        study = optuna.create_study(
            study_name=self.study_name,
            sampler=self.sampler,
            directions=self.objectives.optuna_directions,
            storage=journal_storage(self.run_dir),
            load_if_exists=True,
        )
        if study.metric_names is None:  # optuna-dashboard then says val_accuracy, not "Objective 0"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental in Optuna 5
                study.set_metric_names(list(self.objectives.names))
        return study

    def warm_start(self, study: optuna.Study, cfg: DictConfig) -> int:
        """`warm_start=RUN_DIR`: a new study begins with that earlier sweep's finished trials, which feed the
        sampler and count as no evaluation (search/warm_start.py); nothing for a resumed one. Returns how many."""
        from hwnas.search.warm_start import seed_study

        return seed_study(study, cfg.get("warm_start"), self.space, self.objectives, tuple(cfg.get("plugins") or ()))
