"""`run_dir/sweep.json`: what a resumed sweep needs to find its Optuna study and MLflow parent run."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

STATE_FILE = "sweep.json"
JOURNAL_FILE = "optuna.journal"


@dataclass
class SweepState:
    study_name: str
    parent_run_id: str | None
    created_at: float = field(default_factory=time.time)
    resumed_at: list[float] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> SweepState:
        return cls(**json.loads((Path(run_dir) / STATE_FILE).read_text()))

    def save(self, run_dir: Path) -> None:
        path = Path(run_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


def journal_storage(run_dir: Path) -> optuna.storages.BaseStorage:
    """Optuna's append-only journal in run_dir: the sampler's whole history survives a killed driver."""
    return JournalStorage(JournalFileBackend(str(Path(run_dir).resolve() / JOURNAL_FILE)))
