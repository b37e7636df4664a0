"""MLflow tracking from the driver alone: one parent run per sweep, one child run per trial.

Only the driver process talks to MLflow, so parallel trials never contend on an SQLite store.
Runs are created and ended explicitly with `MlflowClient` (no fluent global "active run").

Child runs are addressed by trial number (tag `trial` under the parent), never only by an id held
in memory, so every operation can be replayed: if the tracking server goes away mid-sweep,
`Tracking` keeps the operations in `run_dir/mlflow_pending.jsonl`, the sweep goes on, and they are
replayed when the server answers again (or by `hwnas-sync run_dir=...`). Replaying an operation
that already reached the server changes nothing, so nothing is logged twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
PENDING_FILE = "mlflow_pending.jsonl"
RETRY_EVERY_S = 15.0

log = logging.getLogger(__name__)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of an `sqlite:///path` URI (relative or absolute), None for anything else."""
    return Path(uri[len("sqlite:///") :]).expanduser() if uri.startswith("sqlite:///") else None


def _prepare(uri: str) -> None:
    # sqlite:///relative/path.db -> make sure the folder exists (MLflow does not create it).
    if (db := _sqlite_file(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow's HTTP client retries a dead server for minutes by default; we queue instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ..." on every run end
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an SQLite store's file, never in the
    current directory (MLflow's default for a database store is ./mlruns of whichever directory the
    command ran in). A server decides for itself (None)."""
    if (db := _sqlite_file(uri)) is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return (db.resolve().parent / "mlartifacts" / slug).as_uri()


def _metrics(values: Mapping[str, Any]) -> list[Metric]:
    ts = int(time.time() * 1000)
    return [
        Metric(k, float(v), ts, 0)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]


class MlflowStore:
    """Idempotent sweep operations on one MLflow tracking server / store. Raises when it is unreachable."""

    def __init__(self, uri: str, experiment: str, registered_model: str) -> None:
        _prepare(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.uri = uri
        self.experiment = experiment
        self.registered_model = registered_model
        self._experiment_id: str | None = None
        self._child: dict[int, str] = {}
        # Live operations know what this process created; only replays must look runs up first.
        self.replaying = False

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.uri, self.experiment))
            )
        return self._experiment_id

    def create_sweep(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def child(self, parent: str, number: int) -> str | None:
        if number not in self._child:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.trial = '{number}'",
                max_results=1,
            )
            if not found:
                return None
            self._child[number] = found[0].info.run_id
        return self._child[number]

    def children(self, parent: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50000
        )

    # --- operations (each safe to replay) ---
    def op_trial_started(self, parent: str, number: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        if number in self._child and not self.replaying:
            return
        if self.replaying and (run_id := self.child(parent, number)) is not None:
            # The server may have died between creating the run and logging its params; an
            # identical param logged again is a no-op in MLflow.
            self._log(run_id, params=params)
            return
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number:04d}",
            tags={"mlflow.parentRunId": parent, "trial": str(number), **tags},
        )
        self._child[number] = run.info.run_id
        self._log(run.info.run_id, params=params)

    def op_trial_ended(
        self,
        parent: str,
        number: int,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifact: str | None,
        status: str,
    ) -> None:
        run_id = self._child.get(number) or self.child(parent, number)
        if run_id is None:
            self.op_trial_started(parent, number, params, {})
            run_id = self._child[number]
        elif self.replaying:
            # The server may have died part-way through this operation: replay only what is missing,
            # so no metric gets a second history entry and no artifact is uploaded twice.
            run = self.client.get_run(run_id)
            if run.info.status == status:
                return  # already recorded
            metrics = {k: v for k, v in metrics.items() if k not in run.data.metrics}
            if artifact and Path(artifact).name in {a.path for a in self.client.list_artifacts(run_id)}:
                artifact = None
        self._log(run_id, metrics=metrics, tags=tags)
        if artifact and Path(artifact).exists():
            self.client.log_artifact(run_id, artifact)
        self.client.set_terminated(run_id, status)

    def op_tag_trial(self, parent: str, number: int, tags: Mapping[str, str]) -> None:
        run_id = self.child(parent, number)
        if run_id is not None:
            self._log(run_id, tags=tags)

    def op_end_run(self, run_id: str, status: str) -> None:
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)

    def op_set_running(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def op_sweep_outputs(self, parent: str, paths: list[str], metrics: Mapping[str, float]) -> None:
        if self.replaying:  # as in op_trial_ended: a metric that reached the server is not logged again
            logged = self.client.get_run(parent).data.metrics
            metrics = {k: v for k, v in metrics.items() if k not in logged}
        self._log(parent, metrics=metrics)
        for p in map(Path, paths):
            if p.is_dir():
                self.client.log_artifacts(parent, str(p), artifact_path=p.name)
            elif p.exists():
                self.client.log_artifact(parent, str(p))

    def op_register(self, parent: str, artifact_subdir: str, tags: Mapping[str, str]) -> str:
        """Register the parent run's `artifact_subdir` (the exported files, unchanged) as a model version."""
        name = self.registered_model
        if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
            self.client.create_registered_model(name)
        for v in self.client.search_model_versions(f"name = '{name}'"):
            if v.run_id == parent and v.tags.get("sha256") == tags.get("sha256"):
                return str(v.version)  # this exact file is registered already
        source = f"{self.client.get_run(parent).info.artifact_uri}/{artifact_subdir}"
        version = self.client.create_model_version(name, source=source, run_id=parent, tags=dict(tags))
        return str(version.version)

    def _log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        p = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in (params or {}).items()]
        m = _metrics(metrics or {})
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # log_batch takes at most 100 params per call.
        for i in range(0, max(len(p), 1), 100):
            self.client.log_batch(run_id, metrics=m if i == 0 else [], params=p[i : i + 100], tags=t if i == 0 else [])


class Tracking:
    """A sweep's tracking that never stops the sweep: failed operations wait on disk and are replayed."""

    def __init__(self, store: MlflowStore, run_dir: Path, parent_id: str) -> None:
        self.store = store
        self.parent_id = parent_id
        self.pending_path = Path(run_dir) / PENDING_FILE
        self._next_retry = 0.0
        self._open: set[int] = set()

    @property
    def registered_model(self) -> str:
        return self.store.registered_model

    @property
    def offline(self) -> bool:
        return self.pending_path.exists() and self.pending_path.stat().st_size > 0

    # --- what the sweep calls ---
    def trial_started(self, number: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self._open.add(number)
        self._do("op_trial_started", parent=self.parent_id, number=number, params=dict(params), tags=dict(tags))

    def trial_ended(
        self,
        number: int,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifact: str | None,
        status: str,
    ) -> None:
        self._open.discard(number)
        self._do(
            "op_trial_ended", parent=self.parent_id, number=number, params=dict(params),
            metrics=dict(metrics), tags=dict(tags), artifact=artifact, status=status,
        )

    def tag_trial(self, number: int, tags: Mapping[str, str]) -> None:
        self._do("op_tag_trial", parent=self.parent_id, number=number, tags=dict(tags))

    def sweep_outputs(self, paths: list[Path], metrics: Mapping[str, float]) -> None:
        self._do("op_sweep_outputs", parent=self.parent_id, paths=[str(p) for p in paths], metrics=dict(metrics))

    def register(self, artifact_subdir: str, tags: Mapping[str, str]) -> str | None:
        """The model version, or None when the server is away (registration then waits on disk)."""
        return self._do("op_register", parent=self.parent_id, artifact_subdir=artifact_subdir, tags=dict(tags))

    def reopen(self) -> None:
        self._do("op_set_running", run_id=self.parent_id)

    def close(self, status: str) -> None:
        """End the sweep: trials still open end as `status` (KILLED on Ctrl-C), then the parent run."""
        for number in sorted(self._open):
            self._do(
                "op_trial_ended", parent=self.parent_id, number=number, params={}, metrics={},
                tags={"status": status}, artifact=None, status=status,
            )
        self._open.clear()
        self._do("op_end_run", run_id=self.parent_id, status=status)
        self.flush(force=True)

    # --- queueing ---
    def flush(self, force: bool = False) -> bool:
        """Replay what waits on disk; True when nothing is left."""
        if not self.offline:
            return True
        if not force and time.monotonic() < self._next_retry:
            return False
        lines = self.pending_path.read_text().splitlines()
        self.store.replaying = True
        try:
            for i, line in enumerate(lines):
                op = json.loads(line)
                try:
                    getattr(self.store, op.pop("op"))(**op)
                except Exception as exc:
                    self._next_retry = time.monotonic() + RETRY_EVERY_S
                    self._rewrite(lines[i:])
                    log.warning("MLflow still unreachable (%s); %d operations wait in %s", exc, len(lines) - i, self.pending_path)
                    return False
        finally:
            self.store.replaying = False
        self._rewrite([])
        return True

    def _do(self, op: str, **kwargs: Any) -> Any:
        # Order matters: while anything waits on disk, new operations queue behind it.
        if self.offline and not self.flush():
            self._append(op, kwargs)
            return None
        try:
            return getattr(self.store, op)(**kwargs)
        except Exception as exc:
            log.warning("MLflow unreachable (%s): keeping %s in %s", type(exc).__name__, op, self.pending_path)
            self._next_retry = time.monotonic() + RETRY_EVERY_S
            self._append(op, kwargs)
            return None

    def _append(self, op: str, kwargs: Mapping[str, Any]) -> None:
        with open(self.pending_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"op": op, **kwargs}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.pending_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.pending_path)
        if not lines:
            self.pending_path.unlink(missing_ok=True)
