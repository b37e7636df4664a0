"""MLflow tracking from the driver alone: one parent run per sweep, one child run per trial.

Only the driver process talks to MLflow, so parallel trials never contend on an SQLite store.
Runs are created and ended explicitly with `MlflowClient` (no fluent global "active run"), and
`close` ends every run still open, so none is left RUNNING after an error or Ctrl-C.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def _prepare_sqlite(uri: str) -> None:
    # sqlite:///relative/path.db -> make sure the folder exists (MLflow does not create it).
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)


class MlflowTracker:
    def __init__(self, uri: str, experiment: str, registered_model: str) -> None:
        _prepare_sqlite(uri)
        # MLflow logs alembic migrations and a "creating experiment" line on first use: noise in a sweep.
        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.uri = uri
        self.registered_model = registered_model
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.parent_id: str | None = None
        self._open: set[str] = set()

    # --- sweep ---
    def start_sweep(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.parent_id = run.info.run_id
        self._open.add(self.parent_id)
        self._log(self.parent_id, params=params)
        return self.parent_id

    def resume_sweep(self, parent_id: str) -> None:
        self.parent_id = parent_id
        self.client.update_run(parent_id, status="RUNNING")
        self._open.add(parent_id)

    def end_sweep(self, status: str = "FINISHED") -> None:
        if self.parent_id is not None and self.parent_id in self._open:
            self.client.set_terminated(self.parent_id, status)
            self._open.discard(self.parent_id)

    # --- trials ---
    def start_trial(self, number: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        assert self.parent_id is not None, "start_sweep first"
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number:04d}",
            tags={"mlflow.parentRunId": self.parent_id, "trial": str(number), **tags},
        )
        run_id = run.info.run_id
        self._open.add(run_id)
        self._log(run_id, params=params)
        return run_id

    def finish_trial(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifact: str | None,
        status: str,
    ) -> None:
        self._log(run_id, metrics=metrics, tags=tags)
        if artifact and Path(artifact).exists():
            self.client.log_artifact(run_id, artifact)
        self.client.set_terminated(run_id, status)
        self._open.discard(run_id)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._log(run_id, tags=tags)

    def log_sweep_artifacts(self, paths: list[Path], metrics: Mapping[str, float]) -> None:
        assert self.parent_id is not None
        self._log(self.parent_id, metrics=metrics)
        for p in paths:
            if p.is_dir():
                self.client.log_artifacts(self.parent_id, str(p), artifact_path=p.name)
            elif p.exists():
                self.client.log_artifact(self.parent_id, str(p))

    def register(self, artifact_subdir: str, tags: Mapping[str, str]) -> str:
        """Register the parent run's `artifact_subdir` (the exported files, unchanged) as a model version."""
        assert self.parent_id is not None
        if not self.client.search_registered_models(filter_string=f"name = '{self.registered_model}'"):
            self.client.create_registered_model(self.registered_model)
        source = f"{self.client.get_run(self.parent_id).info.artifact_uri}/{artifact_subdir}"
        version = self.client.create_model_version(
            self.registered_model, source=source, run_id=self.parent_id, tags=dict(tags)
        )
        return str(version.version)

    def close(self, status: str = "KILLED") -> None:
        """End every run still open (children first), e.g. after Ctrl-C."""
        for run_id in sorted(self._open - {self.parent_id}):
            self.client.set_terminated(run_id, status)
        self._open -= self._open - {self.parent_id}
        self.end_sweep(status)

    def _log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        p = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in (params or {}).items()]
        m = [
            Metric(k, float(v), 0, 0)
            for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # log_batch takes at most 100 params / 1000 metrics per call.
        for i in range(0, max(len(p), 1), 100):
            self.client.log_batch(run_id, metrics=m if i == 0 else [], params=p[i : i + 100], tags=t if i == 0 else [])
