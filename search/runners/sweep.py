"""What a runner is given: everything a sweep needs, already built and validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna

from hwnas.evaluators.base import Evaluator
from hwnas.search.objectives import Objectives
from hwnas.search.recorder import Recorder
from hwnas.search.sweep_state import journal_storage
from hwnas.spaces.base import SearchSpace


@dataclass
class Sweep:
    space: SearchSpace
    sampler: optuna.samplers.BaseSampler
    evaluator: Evaluator
    objectives: Objectives
    n_trials: int
    run_dir: Path
    study_name: str

    def trial_dir(self, number: int) -> Path:
        return self.run_dir / "trials" / f"{number:04d}"


    def storage(self) -> optuna.storages.BaseStorage:
        return journal_storage(self.run_dir)

    def create_study(self) -> optuna.Study:
        """The sweep's study, loaded with its whole history when the sweep is resumed."""
        return optuna.create_study(
            study_name=self.study_name,
            sampler=self.sampler,
            directions=self.objectives.optuna_directions,
            storage=self.storage(),
            load_if_exists=True,
        )


class Runner(Protocol):
    def run(self, sweep: Sweep, recorder: Recorder) -> optuna.Study: ...


def values_tuple(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
