"""End of a sweep: tables, the front, its picture, and the chosen model exported and verified.

export/ is an MLflow model directory (ONNX flavour). Its `model.onnx` is the file whose accuracy and
latency were measured in its trial (checked by SHA-256 before, and graph-identical after, the
preprocessing and labels are written into its metadata); its val accuracy is computed again with ONNX
Runtime and must equal the recorded one exactly; the test split is used here, once. Its latency is
measured again on the sweep's device. With final training (`hwnas-export ... final.epochs=N`) the
candidate is retrained on train+val first and that file is exported, measured and described instead.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from hwnas.evaluators.measure.cache import file_sha256
from hwnas.search.objectives import Objectives
from hwnas.search.pareto import non_dominated_mask
from hwnas.search.schedulers.accounting import schedule_summary
from hwnas.search.selection import select
from hwnas.search.trial_log import COMPLETE, FAILED, artifact_path, trials_frame
from hwnas.search.units import format_ms

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


def _read_json(path: Path) -> dict[str, Any] | None:
    """A record of the run folder (hardware.json), or None when absent or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class ExportRequest:
    """How `hwnas-export` (or the end of a sweep) asks for the export."""

    final_epochs: int | None = None  # retrain the chosen candidate on train+val for this many epochs
    sweep_command: list[str] = field(default_factory=list)  # the overrides the sweep was started with
    export_args: list[str] = field(default_factory=list)  # hwnas-export's own arguments besides run_dir


def _check_measured(run_dir: Path, row: dict[str, Any], evaluator: Any) -> Path:
    """The chosen trial's file, as it was measured: same SHA-256 as recorded, same val accuracy."""
    source = artifact_path(run_dir, row)
    assert source is not None
    if not source.is_file():
        raise ExportError(f"export: {source} (trial {row['number']}) is missing; allowed: the run folder as the sweep left it")
    digest = file_sha256(source)
    if digest != row.get("artifact_sha256"):
        raise ExportError(f"export: {source} changed since it was measured (sha256 {digest} != {row.get('artifact_sha256')})")
    val = evaluator.evaluate_file(str(source), "val")
    if val != row["metrics"]["val_accuracy"]:
        raise ExportError(f"export: val accuracy of {source} is {val}, but {row['metrics']['val_accuracy']} was recorded")
    return source


def _swap_in(staged: Path, out: Path) -> None:
    """Replace export/ by the staged folder; a refused export leaves the previous one in place."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


def export_model(
    run_dir: Path, cfg: DictConfig, row: dict[str, Any], evaluator: Any, request: ExportRequest | None = None,
    n_trials: int = 0,
) -> dict[str, Any]:
    """Make export/ an MLflow model (ONNX flavour) of the chosen trial, verified, re-measured, with its card.

    Without final training the model file is the trial's measured file with preprocessing and labels
    added as ONNX metadata (its graph checked to be byte-identical); its val accuracy, recomputed with
    ONNX Runtime, must equal the trial's exactly. With `request.final_epochs` the candidate is trained
    again from scratch on train+val with the same compression and that file is exported."""
    request = request or ExportRequest()
    out = run_dir / EXPORT_DIR
    staging = run_dir / ".export-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        card = _build_export(run_dir, cfg, row, evaluator, request, staging, n_trials)
        _swap_in(staging / "model", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def _build_export(
    run_dir: Path, cfg: DictConfig, row: dict[str, Any], evaluator: Any, request: ExportRequest, staging: Path,
    n_trials: int,
) -> dict[str, Any]:
    from hwnas.search import model_card as mc

    data = _data_summary(evaluator)
    hardware = _read_json(run_dir / "hardware.json") or {}
    selection = {"rule": cfg.select.rule, "objective": OmegaConf.to_container(cfg.objective, resolve=True)}
    base: dict[str, Any] = {
        "schema": mc.SCHEMA,
        "name": str(cfg.tracking.registered_model),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sweep": {"experiment_name": cfg.experiment_name, "trials": n_trials, "run_dir": str(run_dir)},
        "selection": selection,
        "seed": cfg.seed,
        "libraries": library_versions(),
        "reproduce": mc.reproduce_commands(request.sweep_command, run_dir, request.export_args),
    }
    compression = {
        "prune_ratio": float(row["candidate"].get("prune_ratio", 0.0)),
        "quant": str(row["candidate"].get("quant", "fp32")),
    }
    compression["computes"] = (hardware.get("formats") or {}).get(compression["quant"])
    candidate = {"trial": row["number"], "arch_id": row["arch_id"], "net_id": row.get("net_id"),
                 "params": row["candidate"], "compression": compression}
    if not row.get("artifact") or data is None:
        # A benchmark table's trial: no file to export, the card says which cell was chosen.
        card = {**base, "candidate": candidate, "metrics": row["metrics"], "hardware": hardware or None}
        (staging / "model").mkdir()
        (staging / "model" / mc.CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        return card

    measured = _check_measured(run_dir, row, evaluator)
    source, twin, trained = measured, measured.with_name("model_fp32.onnx"), dict(row["metrics"])
    final: dict[str, Any] = {"ran": False}
    if request.final_epochs:
        seed = evaluator.trial_seed(row["candidate"])
        print(f"[hwnas] export: final training of trial {row['number']} from scratch on train+val, "
              f"{request.final_epochs} epochs (seed {seed}) ...", flush=True)
        started = time.perf_counter()
        result = evaluator.retrain(row["candidate"], staging / "work", request.final_epochs)
        source, twin, trained = Path(result.artifact), staging / "work" / "model_fp32.onnx", dict(result.metrics)
        final = {"ran": True, "epochs": request.final_epochs, "trained_on": "train+val", "seed": seed,
                 "seconds": round(time.perf_counter() - started, 1)}
    input_spec = mc.input_spec(data)
    pre = mc.preprocessing(data, OmegaConf.to_container(cfg.dataset, resolve=True))  # type: ignore[arg-type]
    metadata = {
        "hwnas.model_card_schema": mc.SCHEMA,
        "hwnas.labels": json.dumps(list(data["classes"])),
        "hwnas.preprocessing": json.dumps(pre, sort_keys=True),
        "hwnas.input": json.dumps(input_spec, sort_keys=True),
        "hwnas.trial": str(row["number"]),
        "hwnas.arch_id": str(row["arch_id"]),
        "hwnas.device_id": str(hardware.get("device_id")),
        "hwnas.data_fingerprint": str(data.get("fingerprint")),
        "hwnas.final_training": json.dumps(final, sort_keys=True),
    }
    from hwnas.search.mlflow_model import save_mlflow_model

    example = evaluator.data.sample("val", 4, int(cfg.seed))
    target = getattr(getattr(evaluator, "latency", None), "target", None)
    on_cuda = getattr(target, "provider", "cpu") == "cuda"  # the device it was measured on
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_cuda else ["CPUExecutionProvider"]
    files = save_mlflow_model(source, staging / "model", metadata=metadata, example=example, execution_providers=providers)
    model = staging / "model" / files["model_file"]
    val = evaluator.evaluate_file(str(model), "val")
    if not final["ran"] and val != row["metrics"]["val_accuracy"]:
        raise ExportError(f"export: val accuracy of {model} is {val}, but {row['metrics']['val_accuracy']} was recorded")
    test = evaluator.evaluate_file(str(model), "test")
    if twin.is_file():
        float_val, float_test = evaluator.evaluate_file(str(twin), "val"), evaluator.evaluate_file(str(twin), "test")
    elif compression["quant"] == "fp32":
        float_val, float_test = val, test  # the file is its own float twin
    else:  # a run from before twins were kept: the trial's figure, no test figure
        float_val, float_test = trained.get("float_val_accuracy"), None
    print(f"[hwnas] export: re-measuring {model.name} on {hardware.get('device_id', 'the target')} ...", flush=True)
    fresh = _measure_again(evaluator, model)
    metrics = {
        "val_accuracy": val, "test_accuracy": test, "float_val_accuracy": float_val, "float_test_accuracy": float_test,
        # The export's own figure; the trial's when the device could not be reached (latency_source says which).
        "latency_ms": fresh.get("median_ms", row["metrics"].get("latency_ms")),
        "latency_p90_ms": fresh.get("p90_ms", row["metrics"].get("latency_p90_ms")),
        "latency_source": "trial (not re-measured)" if fresh.get("error") else f"export ({fresh.get('source', 'measured')})",
        "model_bytes": model.stat().st_size, "params": trained.get("params"), "macs": trained.get("macs"),
    }
    latency = {
        "trial": {"p50_ms": row["metrics"].get("latency_ms"), "p90_ms": row["metrics"].get("latency_p90_ms"),
                  "source": _trial_source(row["metrics"])},
        "export": {"p50_ms": fresh.get("median_ms"), "p90_ms": fresh.get("p90_ms"), "cv": fresh.get("cv"),
                   **({"error": fresh["error"]} if fresh.get("error") else {}),
                   "runs": fresh.get("n_runs"), "disturbed": fresh.get("disturbed"), "source": fresh.get("source", "measured"),
                   **({"prediction_error": fresh["prediction_error"]} if fresh.get("prediction_error") else {})},
        "device_id": hardware.get("device_id"), "protocol_key": hardware.get("protocol_key"),
        "protocol": hardware.get("protocol"), "protocol_text": mc.protocol_text(hardware.get("protocol") or {}),
        "target": hardware.get("target"),
    }
    card = {
        **base,
        "candidate": candidate,
        "input": input_spec,
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", len(data["classes"])],
                   "meaning": "one score (logit) per label, in the labels' order; argmax = the predicted class"},
        "preprocessing": pre,
        "labels": list(data["classes"]),
        "metrics": metrics,
        "trial_metrics": row["metrics"],
        "latency": latency,
        "device": hardware.get("fingerprint"),
        "dataset": {"kind": data.get("kind"), "fingerprint": data.get("fingerprint"), "splits": data.get("splits"),
                    "path": data.get("path")},
        "final_training": final,
        # How it was trained: the candidate's train.* knobs over the evaluator's defaults (epochs: the trial's;
        # final training's are in final_training).
        "training": evaluator.training_settings(row["candidate"]) if hasattr(evaluator, "training_settings") else None,
        "files": {"model": files["model_file"], "sha256": files["sha256"], "measured_sha256": row.get("artifact_sha256"),
                  "graph_sha256": files["graph_sha256"], "source_sha256": files["source_sha256"]},
    }
    mc.write_card(staging / "model", card)
    return card


def _measure_again(evaluator: Any, model: Path) -> dict[str, Any]:
    """The exported file timed afresh on the sweep's device; when the device does not answer (agents gone
    after the sweep), the export still happens with the trial's figure, and the card says why there is
    no second one (hwnas-export measures again once the device is back)."""
    from hwnas.evaluators.measure.base import MeasureError

    try:
        return dict(evaluator.measure_fresh(model))
    except (MeasureError, OSError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"[hwnas] warning: export: latency not re-measured: {text}", file=sys.stderr)
        return {"source": "not re-measured", "error": text}


def _trial_source(metrics: dict[str, Any]) -> str:
    if metrics.get("latency_predicted"):
        return "predicted"
    return "cache" if metrics.get("latency_cached") else "measured"


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
    request: ExportRequest | None = None,
) -> str:
    """Tables, picture, the export (an MLflow model on a run of its own, registered), the report. Returns
    the summary a person reads at the end: where the front, the report and the export are, and how to
    open the MLflow UI."""
    write_tables(run_dir, objectives, rows)  # marks feasibility and the front under these objectives
    chosen = choose(rows, objectives, cfg.select.rule)
    plot = _plot(run_dir, objectives, rows, chosen["number"] if chosen else None)
    card = export_model(run_dir, cfg, chosen, evaluator, request, n_trials=len(rows)) if chosen else None
    n_front = sum(r["pareto"] for r in rows)
    if card is not None and tracker is not None and (run_dir / EXPORT_DIR / "MLmodel").is_file():
        registered = tracker.log_export(run_dir / EXPORT_DIR, **_export_run_fields(card))
        card["registered_model"] = registered or {"name": tracker.registered_model, "version": None}  # None: waits on disk
        from hwnas.search.model_card import write_card

        write_card(run_dir / EXPORT_DIR, card)
    report = _report(run_dir, cfg, objectives, rows, card)
    if tracker is not None:
        for r in rows:
            tracker.tag_trial(r["number"], {"pareto": str(r["pareto"]).lower()})
        paths = [run_dir / "trials.csv", run_dir / "pareto.csv", run_dir / "config.yaml"]
        paths += [p for p in (run_dir / DATA_FILE, run_dir / "hardware.json", plot, report) if p is not None and p.is_file()]
        schedule = schedule_summary(rows)
        metrics = {"n_trials": len(rows), "n_failed": sum(r["status"] == FAILED for r in rows), "pareto_size": n_front,
                   "n_stopped": sum(schedule["stopped"].values()), "n_rejected": schedule["rejected"],
                   "epochs_trained": schedule["epochs"]}
        tracker.sweep_outputs(paths, metrics)
    return "\n".join(_summary(run_dir, cfg, objectives, rows, card, report, tracker))


def _export_run_fields(card: dict[str, Any]) -> dict[str, Any]:
    """What the export's own MLflow run and its registered version carry."""
    m, lat, cand = card["metrics"], card["latency"], card["candidate"]
    final = card["final_training"]
    params = {**cand["params"], "trial": cand["trial"], "select.rule": card["selection"]["rule"],
              "final.epochs": final.get("epochs", 0) if final["ran"] else 0}
    metrics = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    metrics.update({f"trial_{k}": v for k, v in (("latency_ms", lat["trial"].get("p50_ms")),
                                                   ("latency_p90_ms", lat["trial"].get("p90_ms"))) if v is not None})
    tags = {"hwnas.trial": str(cand["trial"]), "arch_id": str(cand["arch_id"]), "device_id": str(lat.get("device_id")),
            "protocol_key": str(lat.get("protocol_key")), "data_fingerprint": str(card["dataset"].get("fingerprint")),
            "final_training": str(final["ran"]).lower()}
    version_tags = {**tags, "sha256": card["files"]["sha256"], "quant": cand["compression"]["quant"],
                    **{k: f"{v:.6g}" for k, v in metrics.items() if k in ("val_accuracy", "test_accuracy", "latency_ms",
                                                                             "latency_p90_ms", "float_test_accuracy")}}
    return {"run_name": f"export-trial-{cand['trial']:04d}", "params": params, "metrics": metrics, "tags": tags,
            "version_tags": version_tags}


def _report(run_dir: Path, cfg: DictConfig, objectives: Objectives, rows: list[dict[str, Any]],
            card: dict[str, Any] | None) -> Path | None:
    from hwnas.search.report import write_report

    try:
        return write_report(run_dir, objectives, rows, card=card, title=str(cfg.experiment_name))
    except Exception as exc:  # noqa: BLE001 - the report is a view of what is kept; it never costs the export
        print(f"[hwnas] warning: report.html not written ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _summary(run_dir: Path, cfg: DictConfig, objectives: Objectives, rows: list[dict[str, Any]],
             card: dict[str, Any] | None, report: Path | None, tracker: Tracking | None) -> list[str]:
    failed = sum(r["status"] == FAILED for r in rows)
    n_front = sum(r["pareto"] for r in rows)
    schedule = schedule_summary(rows)
    ended = ""
    if schedule["stopped"] or schedule["rejected"]:
        ended = (f", {sum(schedule['stopped'].values())} stopped early, {schedule['rejected']} rejected before training; "
                 f"{schedule['epochs']:g} of {schedule['epochs_full']:g} training epochs ({100 * schedule['saved_share']:.0f}% saved)")
    lines = [f"[hwnas] {len(rows)} trials ({failed} failed{ended}), front of {n_front} -> {run_dir}",
             f"[hwnas]   front {run_dir / 'pareto.csv'} (picture pareto.png), every trial {run_dir / 'trials.csv'}"]
    if report is not None:
        lines.append(f"[hwnas]   report {report}  (hwnas-report run_dir={run_dir} writes it again)")
    if card is None:
        lines.append("[hwnas] no feasible trial: nothing exported" + (f" (budget {objectives.budget_label})" if objectives.bounds else ""))
    elif "latency" not in card:
        shown = ", ".join(f"{k} {card['metrics'][k]:.4g}" for k in objectives.names if card["metrics"].get(k) is not None)
        lines.append(f"[hwnas] chose trial {card['candidate']['trial']} ({cfg.select.rule}): {shown} -> {run_dir / EXPORT_DIR}")
    else:
        m, lat = card["metrics"], card["latency"]
        final = f", retrained {card['final_training']['epochs']} epochs on train+val" if card["final_training"]["ran"] else ""
        if lat["export"].get("error"):
            latency = f"latency {format_ms(lat['trial']['p50_ms'])} (the trial's; not re-measured: the device did not answer)"
        else:
            latency = f"latency {format_ms(lat['export']['p50_ms'])} re-measured (trial {format_ms(lat['trial']['p50_ms'])})"
        lines.append(
            f"[hwnas] exported trial {card['candidate']['trial']} ({cfg.select.rule}{final}, "
            f"{card['candidate']['compression']['quant']}): test accuracy {m['test_accuracy']:.2%} "
            f"(val {m['val_accuracy']:.2%}), {latency} -> {run_dir / EXPORT_DIR} (MLflow model, card MODEL_CARD.md)"
        )
        reg = card.get("registered_model") or {}
        if reg.get("version"):
            lines.append(f"[hwnas]   registered models:/{reg['name']}/{reg['version']}")
    if tracker is not None:
        from hwnas.search.tracking import ui_command, ui_link

        uri = str(cfg.tracking.uri)
        lines.append(f"[hwnas]   MLflow: {ui_command(uri)}  then open {ui_link(uri, tracker.store.experiment_id)}")
    return lines
