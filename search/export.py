"""End of a sweep: tables, the front, its picture, and the chosen model exported and verified.

The exported `model.onnx` is byte for byte the file whose accuracy and latency were measured in
its trial (checked by SHA-256), and its val accuracy is computed again with ONNX Runtime and must
equal the recorded one exactly; the test split is used here, once.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hwnas.evaluators.measure.cache import file_sha256
from hwnas.search.objectives import Objectives
from hwnas.search.pareto import non_dominated_mask
from hwnas.search.selection import select
from hwnas.search.trial_log import COMPLETE, trials_frame

if TYPE_CHECKING:
    from hwnas.search.tracking import Tracking

EXPORT_DIR = "export"
DATA_FILE = "data.json"  # the data's summary, written by run_sweep when the sweep starts
LIBRARIES = ("torch", "pytorch-lightning", "onnx", "onnxruntime", "optuna", "ray", "mlflow", "hydra-core", "torch-pruning")


class ExportError(RuntimeError):
    """The exported file does not reproduce what was recorded: never ship it."""


def mark_front(rows: list[dict[str, Any]], objectives: Objectives) -> np.ndarray:
    """Set row['feasible'] and row['pareto'] for every row under these objectives and budgets
    (hwnas-export may bring other budgets than the sweep had); returns the feasible complete rows' indices."""
    for r in rows:
        r["feasible"] = r["status"] == COMPLETE and objectives.is_feasible(r["metrics"])
    ok = np.array([i for i, r in enumerate(rows) if r["status"] == COMPLETE and r["feasible"]], dtype=int)
    for r in rows:
        r["pareto"] = False
    if len(ok):
        points = objectives.matrix([rows[i]["metrics"] for i in ok])
        for i, on_front in zip(ok, non_dominated_mask(points, list(objectives.modes)), strict=True):
            rows[i]["pareto"] = bool(on_front)
    return ok


def write_tables(run_dir: Path, objectives: Objectives, rows: list[dict[str, Any]]) -> None:
    """trials.csv (every trial) and pareto.csv (the feasible non-dominated ones)."""
    mark_front(rows, objectives)
    frame = trials_frame(rows, first=objectives.names)
    frame.to_csv(run_dir / "trials.csv", index=False)
    front = frame[frame["pareto"]] if len(frame) else frame
    if len(front):  # with no complete trial there are no objective columns to sort by
        front = front.sort_values(list(objectives.names[:1]), ascending=objectives.modes[0] == "min")
    front.to_csv(run_dir / "pareto.csv", index=False)


def _plot(run_dir: Path, objectives: Objectives, rows: list[dict[str, Any]], chosen: int | None) -> Path | None:
    complete = [r for r in rows if r["status"] == COMPLETE]
    if len(objectives.names) < 2 or not complete:
        return None
    points = objectives.matrix([r["metrics"] for r in complete])
    x_name, y_name = objectives.names[1], objectives.names[0]
    budget = objectives.bounds.get(x_name, (None, None))[1]
    from hwnas.search.plots import plot_pareto  # matplotlib: only once the sweep has ended

    return plot_pareto(
        run_dir / "pareto.png",
        points[:, 1],
        points[:, 0],
        front_mask=np.array([r["pareto"] for r in complete]),
        feasible_mask=np.array([bool(r["feasible"]) for r in complete]),
        x_label=x_name,
        y_label=y_name,
        budget=budget,
        chosen_index=next((i for i, r in enumerate(complete) if chosen is not None and r["number"] == chosen), None),
        failed_count=len(rows) - len(complete),
        title=f"{run_dir.name}: {len(complete)} trials, front of {sum(r['pareto'] for r in complete)}",
    )


def choose(rows: list[dict[str, Any]], objectives: Objectives, rule: str) -> dict[str, Any] | None:
    complete = [r for r in rows if r["status"] == COMPLETE]
    if not complete:
        return None
    points = objectives.matrix([r["metrics"] for r in complete])
    feasible = np.array([bool(r["feasible"]) for r in complete])
    index = select(points, list(objectives.modes), feasible=feasible, rule=rule)
    return None if index is None else complete[index]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _data_summary(evaluator: Any) -> dict[str, Any] | None:
    data = getattr(evaluator, "data", None)
    if data is None or not hasattr(data, "summary"):
        return None
    summary = dict(data.summary())
    summary.pop("cache", None)  # where this machine keeps its decoded copy: not part of the model
    return summary


def export_model(run_dir: Path, cfg: DictConfig, row: dict[str, Any], evaluator: Any) -> dict[str, Any]:
    """Copy the chosen trial's measured file to export/, verify it, and write its model card."""
    out = run_dir / EXPORT_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    card: dict[str, Any] = {
        "trial": row["number"],
        "arch_id": row["arch_id"],
        "candidate": row["candidate"],
        "metrics": row["metrics"],
        "selection": {"rule": cfg.select.rule, "objective": OmegaConf.to_container(cfg.objective, resolve=True)},
        "hardware": OmegaConf.to_container(cfg.hardware, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        # What a deployment must feed the model: classes in output order, input shape, normalisation.
        "data": _data_summary(evaluator),
        "seed": cfg.seed,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "libraries": library_versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    artifact = row.get("artifact")
    if artifact:
        model = out / "model.onnx"
        shutil.copyfile(artifact, model)
        try:
            digest = file_sha256(model)
            if digest != row.get("artifact_sha256"):
                raise ExportError(f"export: {artifact} changed since it was measured (sha256 {digest} != {row.get('artifact_sha256')})")
            val = evaluator.evaluate_file(str(model), "val")
            if val != row["metrics"]["val_accuracy"]:
                raise ExportError(f"export: val accuracy of {model} is {val}, but {row['metrics']['val_accuracy']} was recorded")
        except ExportError:
            model.unlink()  # a refused file is not left in export/ as if it were the verified model
            raise
        card.update(
            model_file="model.onnx",
            sha256=digest,
            val_accuracy=val,
            test_accuracy=evaluator.evaluate_file(str(model), "test"),
            latency_ms=row["metrics"].get("latency_ms"),
            latency_p90_ms=row["metrics"].get("latency_p90_ms"),
            model_bytes=model.stat().st_size,
        )
    (out / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return card


def prepare_export(evaluator: Any) -> None:
    """What the export at the end of a sweep needs that can be made early: the plotting library and
    the evaluator's data. The driver runs this in the background once no further trial will start
    (a trial slot is idle from then on), so its seconds are neither taken from running trials nor
    added after the last one."""
    import hwnas.search.plots  # noqa: F401  (matplotlib)

    warm_up = getattr(evaluator, "warm_up", None)
    if warm_up is not None:
        warm_up()


def finalize(
    run_dir: Path,
    cfg: DictConfig,
    objectives: Objectives,
    rows: list[dict[str, Any]],
    evaluator: Any,
    tracker: Tracking | None,
) -> str:
    """Write tables and picture, export the chosen model, tag and register in MLflow. Returns a summary."""
    write_tables(run_dir, objectives, rows)  # marks feasibility and the front under these objectives
    chosen = choose(rows, objectives, cfg.select.rule)
    plot = _plot(run_dir, objectives, rows, chosen["number"] if chosen else None)
    card = export_model(run_dir, cfg, chosen, evaluator) if chosen else None
    n_front = sum(r["pareto"] for r in rows)
    if tracker is not None:
        for r in rows:
            tracker.tag_trial(r["number"], {"pareto": str(r["pareto"]).lower()})
        paths = [run_dir / "trials.csv", run_dir / "pareto.csv", run_dir / "config.yaml"]
        if (run_dir / DATA_FILE).is_file():
            paths.append(run_dir / DATA_FILE)  # fingerprint, classes, normalisation, splits
        if plot is not None:
            paths.append(plot)
        if card is not None:
            paths.append(run_dir / EXPORT_DIR)
        metrics = {"n_trials": len(rows), "n_failed": sum(r["status"] != COMPLETE for r in rows), "pareto_size": n_front}
        tracker.sweep_outputs(paths, metrics)
        if card is not None and card.get("model_file"):
            v = tracker.register(EXPORT_DIR, {"arch_id": card["arch_id"], "sha256": card["sha256"]})
            card["registered_model"] = {"name": tracker.registered_model, "version": v}  # None: waits for MLflow
            (run_dir / EXPORT_DIR / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    lines = [f"[hwnas] {len(rows)} trials ({sum(r['status'] != COMPLETE for r in rows)} failed), front of {n_front} -> {run_dir}"]
    if card is None:
        lines.append("[hwnas] no feasible trial: nothing exported" + (f" (budget {objectives.budget_label})" if objectives.bounds else ""))
    else:
        shown = ", ".join(f"{k} {card['metrics'][k]:.4g}" for k in objectives.names if card["metrics"].get(k) is not None)
        test = f", test_accuracy {card['test_accuracy']:.4g}" if "test_accuracy" in card else ""
        lines.append(f"[hwnas] exported trial {card['trial']} ({cfg.select.rule}): {shown}{test} -> {run_dir / EXPORT_DIR}")
    return "\n".join(lines)
