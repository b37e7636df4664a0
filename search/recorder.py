"""Driver-side bookkeeping of every trial: the durable trial log, MLflow, and the progress line.

The broker (search/broker.py) reports every trial's events here, whichever runner placed it, so
what a user sees and what is kept does not depend on where the trials ran. A trial number is
recorded at most once, whatever retries or replays report it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.evaluators.measure.cache import file_sha256
from hwnas.search.objectives import Objectives
from hwnas.search.pareto import hypervolume, nadir_reference, non_dominated_mask
from hwnas.search.progress import Progress
from hwnas.search.schedulers.accounting import schedule_line
from hwnas.search.trial_log import (
    COMPLETE,
    FAILED,
    REJECTED,
    RUNGS_JSONL,
    STOPPED,
    TrialLog,
    artifact_path,
    relative_artifact,
)
from hwnas.search.units import display_metrics, format_ms
from hwnas.spaces.candidate import arch_id, net_id

if TYPE_CHECKING:  # MLflow is imported by the driver while Ray starts (cli), not on import
    from hwnas.search.tracking import Tracking


class Recorder:
    def __init__(
        self,
        run_dir: Path,
        objectives: Objectives,
        tracking: Tracking | None,
        progress: Progress,
        tags: Mapping[str, str],
        when_no_trial_left_to_start: Callable[[], None] | None = None,
        row_fields: Mapping[str, str] | None = None,
        on_trial_end: Callable[[list[dict[str, Any]]], None] | None = None,
        dataset: Mapping[str, Any] | None = None,
    ) -> None:
        """`row_fields`: what every trial row carries besides its own numbers, e.g. the latency
        target's device id and protocol key (one per sweep: a pool of agents is one device).
        `on_trial_end(rows)`: told after each trial is recorded (the report is regenerated from it).
        `dataset`: the MLflow dataset input every child run gets (name, fingerprint, splits)."""
        self.run_dir = Path(run_dir)
        self.log = TrialLog(run_dir)
        self.rung_log = TrialLog(run_dir, RUNGS_JSONL)
        self.on_trial_end = on_trial_end
        self.dataset = dict(dataset) if dataset else None
        self.row_fields = dict(row_fields or {})
        self.objectives = objectives
        self.tracking = tracking
        self.progress = progress
        self.tags = dict(tags)
        self.running: dict[int, float] = {}  # trial number -> time.time() it started
        self.rows = self.log.rows()  # a resumed sweep starts from what is already recorded
        self.numbers = {r["number"] for r in self.rows}
        self.duplicates = 0
        # Driver work for the end of the sweep, run in the background as soon as no further trial
        # will start (the broker says when): from then on a trial slot is idle, so it costs the trials
        # nothing.
        self._when_no_trial_left = when_no_trial_left_to_start
        self._background: threading.Thread | None = None
        self.progress.follow(self.snapshot)

    @property
    def done(self) -> int:
        return len(self.rows)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == FAILED for r in self.rows)

    def started(self, number: int, candidate: Mapping[str, Any]) -> None:
        if number in self.running or number in self.numbers:
            return  # a retried trial (worker lost) keeps its one record
        self.running[number] = time.time()
        if self.tracking is not None:
            self.tracking.trial_started(number, candidate, {**self.tags, "arch_id": arch_id(candidate), "status": "RUNNING"})
            if self.dataset is not None:
                self.tracking.log_dataset(number, self.dataset)

    def user_attrs(self, number: int, candidate: Mapping[str, Any]) -> dict[str, str]:
        """What the Optuna trial carries so that optuna-dashboard links it to the rest: its MLflow run,
        the device and protocol its latency was measured with, the data, its folder."""
        attrs = {"arch_id": arch_id(candidate), "trial_dir": f"trials/{number:04d}", **self.row_fields}
        if self.dataset is not None:
            attrs["data_fingerprint"] = str(self.dataset.get("fingerprint"))
        run_id = self.tracking.trial_run_id(number) if self.tracking is not None else None
        if run_id:
            attrs["mlflow_run_id"] = run_id
        return attrs

    def finished(
        self,
        number: int,
        candidate: Mapping[str, Any],
        metrics: Mapping[str, float],
        artifact: str | None,
        node: str | None,
    ) -> None:
        row = self._row(number, candidate, COMPLETE, node)
        # The record names the file relative to the run folder (the folder can be moved); its hash is
        # taken now, so the export can tell the measured file from anything put there later.
        row.update(metrics=dict(metrics), feasible=self.objectives.is_feasible(metrics),
                   artifact=relative_artifact(self.run_dir, artifact))
        if artifact:
            row["artifact_sha256"] = file_sha256(artifact)
        self._end(row)

    def failed(self, number: int, candidate: Mapping[str, Any], error: str, node: str | None) -> None:
        row = self._row(number, candidate, FAILED, node)
        row.update(metrics={}, feasible=False, error=error)
        self._end(row)

    def rung_records(self) -> list[dict[str, Any]]:
        """Every rung decision recorded so far (a resumed sweep's scheduler is rebuilt from them)."""
        return self.rung_log.rows()

    def rung(self, number: int, candidate: Mapping[str, Any], epoch: int, values: list[float], keep: bool,
             metrics: Mapping[str, float]) -> None:
        """A rung decision, in rungs.jsonl before anything acts on it (the trial stops or trains on)."""
        self.rung_log.append({"number": number, "key": arch_id(candidate), "epoch": epoch, "values": values,
                              "keep": keep, "metrics": dict(metrics), "at": time.time()})

    def ended_early(self, number: int, candidate: Mapping[str, Any], how: str, metrics: Mapping[str, float],
                    epoch: int, node: str | None, why: str | None = None) -> None:
        """The scheduler ended the trial: "rejected" before training (its untrained file over a budget) or
        "stopped" at rung `epoch`. Never feasible (never on the front, never exported); its metrics are the
        untrained file's (latency_ms, model_bytes, ...) and, when stopped, rung_val_accuracy. `why` goes in the
        row's error field (trials.csv's error column: why the trial has no result)."""
        row = self._row(number, candidate, REJECTED if how == "rejected" else STOPPED, node)
        row.update(metrics=dict(metrics), feasible=False, artifact=None, epochs=epoch, error=why)
        self._end(row)

    def duplicate(self) -> None:
        self.duplicates += 1

    def no_trial_left_to_start(self) -> None:
        """Told by the broker when a trial ended and none is left to start: run the end-of-sweep
        work in the background, once (a trial slot stays idle from now on)."""
        work = self._when_no_trial_left
        if work is not None:
            self._when_no_trial_left = None
            self._background = threading.Thread(target=self._run_quietly, args=(work,), daemon=True)
            self._background.start()

    def close(self) -> None:
        self.progress.close()
        if self._background is not None:
            self._background.join()

    # --- internals ---
    def _row(self, number: int, candidate: Mapping[str, Any], status: str, node: str | None) -> dict[str, Any]:
        return {
            "number": number,
            "status": status,
            "candidate": dict(candidate),
            "arch_id": arch_id(candidate),
            "net_id": net_id(candidate),
            "node": node,
            "finished_at": time.time(),
            "error": None,
            **self.row_fields,
        }

    def _end(self, row: dict[str, Any]) -> None:
        number = row["number"]
        if number in self.numbers:
            return
        row["started_at"] = self.running.pop(number, None)
        # The durable log first: whatever happens to MLflow next, the result is kept.
        self.log.append(row)
        self.rows.append(row)
        self.numbers.add(number)
        if self.tracking is not None:
            tags = {"status": row["status"], "feasible": str(row["feasible"]).lower(), "node": str(row["node"])}
            if row["error"]:
                tags["error"] = row["error"][:5000]
            status = "FAILED" if row["status"] == FAILED else "FINISHED"  # a stopped trial ran as scheduled
            file = artifact_path(self.run_dir, row)
            metrics = display_metrics(row["metrics"])
            if row.get("epochs") is not None:  # a stopped or rejected trial: the epochs it trained, as trials.csv
                metrics["epochs"] = float(row["epochs"])
            self.tracking.trial_ended(number, row["candidate"], metrics, tags, str(file) if file else None, status)
        if self.on_trial_end is not None:
            self.on_trial_end(list(self.rows))

    @staticmethod
    def _run_quietly(work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            pass  # only a head start: the export does the same work itself and reports any error

    def front_and_best(self) -> tuple[int, str]:
        ok = [r for r in list(self.rows) if r["status"] == COMPLETE and r["feasible"]]
        if not ok:
            return 0, "-"
        points = self.objectives.matrix([r["metrics"] for r in ok])
        modes = list(self.objectives.modes)
        front = int(non_dominated_mask(points, modes).sum())
        primary, mode = self.objectives.names[0], self.objectives.modes[0]
        best_i = int(np.argmax(points[:, 0]) if mode == "max" else np.argmin(points[:, 0]))
        best = f"{primary} {points[best_i, 0]:.4g}"
        if len(self.objectives.names) > 1:
            second = self.objectives.names[1]
            value = format_ms(points[best_i, 1]) if second.endswith("_ms") else f"{points[best_i, 1]:.4g}"
            best += f" at {value}"
            # Hypervolume against the nadir of the feasible trials (the report states the same reference).
            best += f" | HV {hypervolume(points, modes, nadir_reference(points, modes)):.4g}"
        return front, best

    def snapshot(self) -> tuple[int, int, int, int, str]:
        """What the progress line shows; called from the progress thread (reads only)."""
        front, best = self.front_and_best()
        schedule = schedule_line(list(self.rows))
        if schedule:
            best += f" | {schedule}"
        if self.tracking is not None and self.tracking.offline:
            best += " | MLflow offline: queued on disk"
        return self.done, len(self.running), self.n_failed, front, best
