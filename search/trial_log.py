"""The sweep's own durable record of trials: one JSON line per finished trial, appended and fsynced.

This file, not MLflow or Ray, is the source of truth for `trials.csv`, the front and the export:
an interrupted sweep keeps every trial that finished, whatever happened to the tracking server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hwnas.search.units import TIME_PREFIX, display_metrics, display_name

TRIALS_JSONL = "trials.jsonl"
COMPLETE, FAILED = "COMPLETE", "FAILED"
# Ended by the sweep's scheduler (search/schedulers/): STOPPED at a rung (MO-ASHA), REJECTED before training
# (latency-first: its untrained file was over a budget). Neither is ever on the front or exported.
STOPPED, REJECTED = "STOPPED", "REJECTED"
STATUSES = (COMPLETE, FAILED, STOPPED, REJECTED)
RUNGS_JSONL = "rungs.jsonl"  # every rung decision (MO-ASHA), appended and fsynced: the scheduler's state on resume


class TrialLog:
    def __init__(self, run_dir: Path, name: str = TRIALS_JSONL) -> None:
        self.path = Path(run_dir) / name

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, sort_keys=True, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict[str, Any]]:
        return list(self._iter())

    def _iter(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                # A driver killed mid-write leaves at most one torn last line; it is not a trial.
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue


def relative_artifact(run_dir: Path, path: str | None) -> str | None:
    """A trial's file as the record keeps it: relative to the run folder when inside it, so the folder
    can be moved or copied; absolute when it lies elsewhere (a cluster's `runner.storage`)."""
    if not path:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return str(p)


def artifact_path(run_dir: Path, row: dict[str, Any]) -> Path | None:
    """The file a row names, wherever the run folder is now (rows before relative paths hold absolute ones)."""
    artifact = row.get("artifact")
    if not artifact:
        return None
    p = Path(artifact)
    return p if p.is_absolute() else Path(run_dir) / p


# Metrics that count things (the evaluator reports every metric as a float): integers in trials.csv.
INTEGER_METRICS = frozenset({
    "model_bytes", "params", "macs", "latency_rounds", "latency_runs", "latency_pred_n", "latency_cached",
    "latency_predicted", "latency_prescreened", "latency_disturbed", "init_loaded_tensors", "init_skipped_tensors",
    "latency_early", "train_epochs", "train_epochs_full", "epochs",
})

# Per-sweep fields every row carries (search/experiment.py): the latency target's device and protocol.
ROW_FIELDS = ("device_id", "latency_protocol")


def trials_frame(rows: list[dict[str, Any]], first: Sequence[str] = ()) -> pd.DataFrame:
    """Flatten rows for trials.csv, in trial order: id and status columns, then the `first` metrics (the
    objectives), then params, then the other metrics (step times as `time/<step>_s`), then where and how
    latency was measured, the node, the error and the file (relative to the run folder). Integer columns
    stay integers."""
    flat = []
    for r in sorted(rows, key=lambda r: r["number"]):
        item = {
            "number": r["number"],
            "status": r["status"],
            "arch_id": r["arch_id"],
            "net_id": r.get("net_id"),
            "feasible": r.get("feasible"),
            "pareto": r.get("pareto", False),
            # Training epochs the trial ran: all of them (COMPLETE), up to its rung (STOPPED), none (REJECTED).
            "epochs": r.get("epochs", (r.get("metrics") or {}).get("train_epochs")),
        }
        item.update(r["candidate"])
        item.update(display_metrics(r.get("metrics") or {}))
        # Where and how latency_ms was measured (rows of sweeps before issue 11 have neither).
        for key in ROW_FIELDS:
            if key in r:
                item[key] = r[key]
        item["node"] = r.get("node")
        item["error"] = r.get("error")
        item["artifact"] = r.get("artifact")
        flat.append(item)
    frame = pd.DataFrame(flat)
    params = list(dict.fromkeys(k for r in rows for k in r["candidate"]))
    metrics = list(dict.fromkeys(display_name(k) for r in rows for k in (r.get("metrics") or {})))
    times = [m for m in metrics if m.startswith(TIME_PREFIX)]  # step times after the results
    # The objectives stay right after the identity (readers index them); epochs follow.
    order = ["number", "status", "arch_id", "net_id", "feasible", "pareto", *first, "epochs", *params,
             *[m for m in metrics if m not in times], *times, *ROW_FIELDS, "node", "error", "artifact"]
    frame = frame[[c for c in dict.fromkeys(order) if c in frame.columns]]
    if "epochs" in frame.columns and frame["epochs"].isna().all():  # a sweep that trains nothing (a table)
        frame = frame.drop(columns="epochs")
    # Parameters that are integers (widths, depths) stay integers where a trial lacks them (NaN otherwise
    # turns the column into floats).
    for col in frame.columns:
        raw = [item[col] for item in flat if item.get(col) is not None]
        counts = col in INTEGER_METRICS and all(isinstance(v, (int, float)) and float(v).is_integer() for v in raw)
        if raw and (counts or all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
            frame[col] = frame[col].astype("Int64")
    return frame
