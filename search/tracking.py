"""MLflow tracking from the driver alone: one parent run per sweep, one child run per trial.

Only the driver process talks to MLflow, so parallel trials never contend on an SQLite store.
Runs are created and ended explicitly with `MlflowClient` (no fluent global "active run").

Child runs are addressed by trial number (tag `trial` under the parent), never only by an id held
in memory, so every operation can be replayed: if the tracking server goes away mid-sweep,
`Tracking` keeps the operations in `run_dir/mlflow_pending.jsonl`, the sweep goes on, and they are
replayed when the server answers again (or by `hwnas-sync run_dir=...`). Replaying an operation
that already reached the server changes nothing, so nothing is logged twice.

The export is a run of its own under the sweep's parent, with an MLflow 3 LoggedModel made from the
export folder (an MLflow model directory, hwnas.search.mlflow_model) and a registered version of it;
the data is a dataset input of the parent and of each trial's run. Links into the UI (`ui_link`)
open the classic ML runs table, not the GenAI view MLflow 3 shows by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
PENDING_FILE = "mlflow_pending.jsonl"
RETRY_EVERY_S = 15.0
EXPORT_SHA_TAG = "hwnas.export_sha256"  # finds an export's run and logged model again (replay, re-export)
MODEL_FILE = "model.onnx"  # hwnas.search.mlflow_model.MODEL_FILE
# MLflow 3 asks which kind an experiment is (GenAI or ML) unless this tag says it; ours are ML.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui` / `mlflow server` default address

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


def ui_address(tracking_uri: str, ui: str | None = None) -> str:
    """Where a browser opens the MLflow UI of `tracking_uri`: the server itself for http(s), else `ui`
    (default the address `mlflow ui --backend-store-uri <uri>` listens on)."""
    if ui:
        return ui.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None, ui: str | None = None) -> str:
    """A link that opens the experiment's runs table (or one run) in MLflow 3's classic ML view.

    MLflow 3.17's UI is a hash-routed single page app; its experiment page reads `workflowType` from
    the route's query (`?workflowType=machine_learning` wins over the view last chosen in the
    browser, which defaults to GenAI) and `/experiments/<id>/runs` is the runs tab."""
    path = f"/experiments/{quote(str(experiment_id), safe='')}/runs"
    if run_id:
        path += f"/{quote(str(run_id), safe='')}"
    return f"{ui_address(tracking_uri, ui)}/#{path}?workflowType=machine_learning"


def ui_command(tracking_uri: str) -> str:
    """The command that serves the UI for `tracking_uri`, runnable from any folder (an SQLite path
    made absolute); for a tracking server, which serves its own UI, a line saying so."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')} (the tracking server serves its UI)"
    if (db := _sqlite_file(tracking_uri)) is not None:
        tracking_uri = f"sqlite:///{db.resolve()}"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def _dataset_entity(dataset: Mapping[str, Any]) -> Dataset | None:
    """An MLflow dataset from a data summary (run_dir/data.json: kind, path or module, fingerprint,
    input_shape, classes, normalization, splits); `name` defaults to the kind and the source's name.
    None without a fingerprint (the digest MLflow needs)."""
    fingerprint = dataset.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        return None
    where = dataset.get("path") or dataset.get("module")
    kind = str(dataset.get("kind") or "data")
    name = dataset.get("name") or (f"{kind}:{Path(str(where)).name}" if dataset.get("path") else kind)
    source = {k: dataset[k] for k in ("kind", "path", "module") if dataset.get(k) is not None}
    schema = dataset.get("input") or {
        k: dataset[k] for k in ("input_shape", "classes", "normalization") if dataset.get(k) is not None
    }
    profile = {"splits": dataset.get("splits") or {}}
    return Dataset(
        name=str(name), digest=fingerprint, source_type="hwnas", source=json.dumps(source, sort_keys=True),
        schema=json.dumps(schema, sort_keys=True, default=str), profile=json.dumps(profile, sort_keys=True),
    )


@contextlib.contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for a moment, then both it and the
    MLFLOW_TRACKING_URI variable put back exactly (MLflow's own `_use_tracking_uri` unsets the
    variable when no URI had been set)."""
    try:
        from mlflow.tracking._tracking_service import utils as service
        before = service._tracking_uri
    except (ImportError, AttributeError):  # a later MLflow: leave the caller's setting alone
        yield
        return
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    service.set_tracking_uri(uri)
    try:
        yield
    finally:
        service.set_tracking_uri(before)  # type: ignore[arg-type]  # None: back to MLflow's default
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


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
            if found and EXPERIMENT_KIND_TAG not in found.tags:  # made by an older hwnas or by hand
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            self._experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    self.experiment,
                    artifact_location=artifact_location(self.uri, self.experiment),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
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

    def op_log_export(
        self,
        parent: str,
        export_dir: str,
        run_name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        version_tags: Mapping[str, str],
    ) -> dict[str, str]:
        """The export folder (an MLflow model directory) as a run of its own under the sweep's parent,
        a LoggedModel of that run and a version of `registered_model`. Every step first looks for what
        an earlier (partial) attempt made, found by the model file's sha256, so replays and re-exports
        of the same file add nothing twice."""
        from hwnas.evaluators.onnx_check import load_checked

        folder = Path(export_dir)
        sha = hashlib.sha256(load_checked(folder / MODEL_FILE)).hexdigest()
        run_id = self._export_run(parent, sha, run_name, tags)
        self._log_missing(run_id, params, metrics)
        self.client.log_artifacts(run_id, str(folder), artifact_path="export")  # same files: overwritten alike
        model_id = self._logged_model(run_id, sha, run_name, folder)
        run = self.client.get_run(run_id)
        if model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        version = self._model_version(run_id, model_id, sha, version_tags)
        if self.client.get_run(run_id).info.status != "FINISHED":
            self.client.set_terminated(run_id, "FINISHED")
        return {"run_id": run_id, "model_id": model_id, "name": self.registered_model, "version": version}

    def _export_run(self, parent: str, sha: str, run_name: str, tags: Mapping[str, str]) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{EXPORT_SHA_TAG}` = '{sha}'",
            max_results=1,
        )
        all_tags = {
            **{k: str(v) for k, v in tags.items()},
            "mlflow.parentRunId": parent, "hwnas.role": "export", "hwnas.sweep_run_id": parent, EXPORT_SHA_TAG: sha,
        }
        if found:
            run_id = found[0].info.run_id
            self._log(run_id, tags=all_tags)  # setting a tag again is a no-op; a re-export's tags win
            return run_id
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id

    def _log_missing(self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        # Params cannot change once logged (MLflow refuses): keep the first. A metric is logged again
        # only when its value changed (a re-export re-measures), so a replay adds no history entry.
        data = self.client.get_run(run_id).data
        params = {k: v for k, v in params.items() if k not in data.params}
        metrics = {k: v for k, v in metrics.items() if k not in data.metrics or data.metrics[k] != v}
        self._log(run_id, params=params, metrics=metrics)

    def _logged_model(self, run_id: str, sha: str, name: str, folder: Path) -> str:
        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{run_id}' and tags.`{EXPORT_SHA_TAG}` = '{sha}'",
        )
        ready = [m for m in found if str(m.status) == "READY"]
        if ready:
            return ready[0].model_id
        pending = [m for m in found if str(m.status) == "PENDING"]
        model = pending[0] if pending else self.client.create_logged_model(
            self.experiment_id, name=re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model",
            source_run_id=run_id, tags={EXPORT_SHA_TAG: sha}, model_type="onnx",
        )
        self.client.log_model_artifacts(model.model_id, str(folder))  # the folder exactly as saved
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def _model_version(self, run_id: str, model_id: str, sha: str, version_tags: Mapping[str, str]) -> str:
        name = self.registered_model
        tags = {**{k: str(v) for k, v in version_tags.items()}, "sha256": sha, "model_id": model_id}
        if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
            self.client.create_registered_model(name, tags={"hwnas": "export"})
        for v in self.client.search_model_versions(f"name = '{name}'"):
            if v.tags.get("sha256") == sha and v.tags.get("model_id") == model_id:
                for k, value in tags.items():  # a re-export's figures (fresh latency) replace the old ones
                    if v.tags.get(k) != value:
                        self.client.set_model_version_tag(name, v.version, k, value)
                return str(v.version)
        # An SQL registry resolves a `models:/<id>` source with a client of the *global* tracking URI
        # (mlflow/store/model_registry/sqlalchemy_store.py), not this store's: point it here meanwhile.
        with _use_tracking_uri(self.uri):
            version = self.client.create_model_version(
                name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id,
            )
        return str(version.version)

    def op_log_dataset(self, parent: str, number: int | None, dataset: Mapping[str, Any]) -> None:
        """The sweep's data as an MLflow dataset input (context `training`) of the parent run, or of
        trial `number`'s run; nothing when that run already has it."""
        run_id = parent if number is None else self.child(parent, number)
        if run_id is None:  # operations run in order, so a trial logged before this has its run
            log.warning("MLflow: no run for trial %s under %s; its dataset input is not logged", number, parent)
            return
        entity = _dataset_entity(dataset)
        if entity is None:  # not a reason to hold back the operations queued behind this one
            log.warning("MLflow: the data summary has no fingerprint; no dataset input is logged")
            return
        inputs = self.client.get_run(run_id).inputs
        for have in inputs.dataset_inputs if inputs else []:
            if have.dataset.name == entity.name and have.dataset.digest == entity.digest:
                return
        self.client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])

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
    def trial_run_id(self, number: int) -> str | None:
        """The trial's child run, when this process created or found it (None while MLflow is away)."""
        return self.store._child.get(number)

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

    def log_export(
        self,
        export_dir: Path,
        run_name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        version_tags: Mapping[str, str],
    ) -> dict[str, str] | None:
        """{"run_id", "model_id", "name", "version"} of the export, or None when MLflow is away (the
        operation then waits on disk and is replayed like every other)."""
        return self._do(
            "op_log_export", parent=self.parent_id, export_dir=str(Path(export_dir).resolve()), run_name=run_name,
            params=dict(params), metrics=dict(metrics), tags=dict(tags), version_tags=dict(version_tags),
        )

    def log_dataset(self, number: int | None, dataset: Mapping[str, Any]) -> None:
        """The data as a dataset input of the parent run (number None) or of trial `number`'s run."""
        self._do("op_log_dataset", parent=self.parent_id, number=number, dataset=dict(dataset))

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
