"""Build a sweep from a validated config, run it, and leave every result on disk and in MLflow."""

from __future__ import annotations

import inspect
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from hwnas.evaluators.measure.base import target_config
from hwnas.search.broker import Broker
from hwnas.search.config import ConfigError
from hwnas.search.export import DATA_FILE, ExportRequest, finalize, prepare_export, write_tables
from hwnas.search.objectives import Objectives
from hwnas.search.progress import Progress
from hwnas.search.recorder import Recorder
from hwnas.search.runners.sweep import Sweep
from hwnas.search.study_record import reconcile_study
from hwnas.search.sweep_state import STATE_FILE, SweepState
from hwnas.search.trial_log import FAILED, TrialLog

if TYPE_CHECKING:
    from hwnas.evaluators.measure.plan import LatencyPlan
    from hwnas.search.tracking import Tracking

CONFIG_FILE = "config.yaml"
HARDWARE_FILE = "hardware.json"  # the latency target: device fingerprint, protocol, cache, predictor


@dataclass
class Built:
    cfg: DictConfig
    sweep: Sweep
    runner: Any
    objectives: Objectives
    data: dict[str, Any] | None = None  # the data's summary once prepared (launch.prepare_data)
    hardware: dict[str, Any] | None = None  # the latency target's device, protocol, cache, predictor (hardware.json)
    overrides: list[str] | None = None  # the command line's overrides (the model card's command to make it again)


def _build(group: str, node: DictConfig, **kwargs: Any) -> Any:
    """instantiate(), with a constructor's ValueError turned into a one-line ConfigError for that group,
    and the built object checked against the group's interface (the evaluator once it is called)."""
    try:
        built = instantiate(node, **kwargs)
    except Exception as exc:  # Hydra wraps constructor errors in InstantiationException
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(cause, (ValueError, TypeError, RuntimeError, FileNotFoundError, KeyError)):
            raise ConfigError(text if text.startswith(f"{group}.") or text.startswith(group) else f"{group}: {text}") from None
        raise
    if group != "evaluator":  # conf/evaluator is _partial_: checked once called with its runtime objects
        _check_interface(group, built, node._target_)
    return built


def _check_interface(group: str, built: Any, target: str) -> None:
    from hwnas.search.plugins import PluginError, check_interface

    try:
        check_interface(group, built, target)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


def _accepted(target: Any, offered: dict[str, Any]) -> dict[str, Any]:
    # Evaluators take only the runtime objects they need (a table needs no dataset, a pipeline does).
    params = inspect.signature(target).parameters
    return {k: v for k, v in offered.items() if k in params}


def build_experiment(cfg: DictConfig) -> Built:
    """Build every object a sweep needs. Cheap: no data is loaded and nothing is started."""
    objectives = Objectives.from_config(OmegaConf.to_container(cfg.objective, resolve=True))  # type: ignore[arg-type]
    space = _build("space", cfg.space)
    sampler = _build("search", cfg.search)
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise ConfigError(f"search._target_: {cfg.search._target_} is not an optuna BaseSampler")
    latency = build_latency(cfg, objectives)
    data = _build("dataset", cfg.dataset)
    evaluator_factory = _build("evaluator", cfg.evaluator)
    from hwnas.evaluators.compression_options import from_config as compression_settings

    compression = compression_settings(cfg.get("compression"))
    offered = {"space": space, "data": data, "latency": latency, "seed": cfg.seed, "objectives": objectives,
               "compression": compression}
    if "compression" not in _accepted(evaluator_factory, offered) and not compression.is_default:
        raise ConfigError(f"compression: {cfg.evaluator._target_} does not train, so it cannot compress by training; "
                          "allowed: the compression defaults (qat_epochs 0, distill.teacher null) with this evaluator")
    try:
        evaluator = evaluator_factory(**_accepted(evaluator_factory, offered))
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A message naming its key already (evaluator.*, or compression.* / space.* the evaluator checks) keeps it.
        raise ConfigError(text if text.startswith(("evaluator.", "compression.", "space.")) else f"evaluator: {text}") from None
    _check_interface("evaluator", evaluator, cfg.evaluator._target_)
    reported = getattr(evaluator, "metric_names", None)
    if reported is not None:
        for i, name in enumerate(objectives.names):
            if name not in reported:
                raise ConfigError(
                    f"objective.metrics[{i}].name: {name!r} is not reported by the evaluator; allowed: {', '.join(sorted(reported))}"
                )
        for name in objectives.bounds:
            if name not in reported:
                raise ConfigError(f"objective.budgets.{name}: not reported by the evaluator; allowed: {', '.join(sorted(reported))}")
    runner = _build("runner", cfg.runner)
    scheduler = _build("scheduler", cfg.scheduler, directions=list(objectives.modes))
    _check_scheduler(cfg, scheduler, evaluator, objectives)
    quant = cfg.space.get("quant")
    if quant is not None and latency.uses_device:
        _check_formats(list(quant), latency)
    sweep = Sweep(
        space=space,
        sampler=sampler,
        evaluator=evaluator,
        objectives=objectives,
        n_trials=cfg.n_trials,
        run_dir=Path(cfg.run_dir),
        study_name=cfg.experiment_name,
        scheduler=scheduler,
    )
    return Built(cfg=cfg, sweep=sweep, runner=runner, objectives=objectives, hardware=latency.summary())


def _check_scheduler(cfg: DictConfig, scheduler: Any, evaluator: Any, objectives: Objectives) -> None:
    """A scheduler with rungs needs an evaluator that trains and reports epochs, objectives a rung can give,
    and rungs within the epochs a trial trains."""
    if not scheduler.rungs:
        return
    from hwnas.search.schedulers.latency_first import UNTRAINED_METRICS

    if not getattr(evaluator, "reports_epochs", False):
        raise ConfigError(f"scheduler: {cfg.scheduler._target_} stops trials between training epochs, and "
                          f"{cfg.evaluator._target_} does not train; allowed: scheduler=full with this evaluator")
    for i, name in enumerate(objectives.names):
        if name != "val_accuracy" and name not in UNTRAINED_METRICS:
            raise ConfigError(f"objective.metrics[{i}].name: {name!r} is not known at a rung, and scheduler=moasha ranks "
                              f"by the objectives there; allowed: val_accuracy, {', '.join(sorted(UNTRAINED_METRICS))}")
    # A rung at a trial's last epoch is its end, not a judgment (Syne Tune's max_t rung): allowed, never judged.
    searched = cfg.space.train.get("epochs") if isinstance(cfg.space.get("train"), DictConfig) else None
    if searched is not None:
        most = max(searched) if isinstance(searched, ListConfig) else searched.get("high") if isinstance(searched, DictConfig) else None
        where = "the largest space.train.epochs"
    else:
        most, where = getattr(evaluator, "epochs", None), "evaluator.epochs"
    if isinstance(most, int) and max(scheduler.rungs) > most:
        raise ConfigError(f"scheduler.rungs: {max(scheduler.rungs)} is beyond {where} ({most}): no trial would reach it; "
                          f"allowed: rung epochs <= {most} (a rung at the last epoch is the end of training, not a judgment)")


def build_latency(cfg: DictConfig, objectives: Objectives) -> LatencyPlan:
    """conf/hardware: the target (its own keys), and how latencies are obtained (cache, predictor,
    prescreen). Checked here, before any work: every agent answers, the predictor loads."""
    from hwnas.evaluators.measure.plan import LatencyPlan

    node = cfg.hardware
    bound = objectives.bounds.get("latency_ms")
    target_node = OmegaConf.create(target_config(node))
    target = _build("hardware", target_node)
    try:
        plan = LatencyPlan(
            target,
            cache=node.get("cache"),
            predictor=node.get("predictor"),
            prescreen=bool(node.get("prescreen", False)),
            budget_ms=bound[1] if bound is not None and bound[0] == "upper" else None,
        )
        plan.check()
    except (RuntimeError, ValueError, OSError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(text if text.startswith("hardware") else f"hardware: {text}") from None
    return plan


def _check_formats(formats: list[str], plan: LatencyPlan) -> None:
    """A numeric format is searched only where the target computes in it (evaluators/measure/formats.py)."""
    from hwnas.evaluators.measure.formats import check_formats

    try:
        check_formats(formats, plan.target.provider, plan.fingerprint())
    except ValueError as exc:
        raise ConfigError(f"space.quant: {str(exc).strip().splitlines()[0]}") from None


# Keys a resumed sweep may change: where and how it runs, not what it searches.
# Where the device pool answers may change (agents restarted elsewhere): the device and protocol may not
# (check_same_device compares them with hardware.json).
RESUMABLE_PREFIXES = (
    "resume", "run_dir", "runner", "tracking", "hardware.cache", "hardware.urls", "hardware.token_env",
    "hardware.timeout_s", "hardware.retries", "hardware.backoff_s",
)


def check_same_device(run_dir: Path, hardware: dict[str, Any] | None) -> None:
    """Resuming: the latencies still to come are measured on the device, with the protocol, of those recorded."""
    path = run_dir / HARDWARE_FILE
    if hardware is None or not path.is_file():
        return  # a run from before hardware.json, or a table benchmark
    try:
        saved = json.loads(path.read_text())
        device, protocol = str(saved["device_id"]), str(saved["protocol_key"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"run_dir: {str(path)!r} is not the hardware.json hwnas wrote; allowed: that file") from None
    if (device, protocol) != (hardware["device_id"], hardware["protocol_key"]):
        raise ConfigError(
            f"hardware: the run was measured on device {device} with protocol {protocol}; this target is device "
            f"{hardware['device_id']} with protocol {hardware['protocol_key']}; allowed: the same device and protocol "
            "(a new run_dir for another device)"
        )


def prepare_run_dir(cfg: DictConfig) -> Path:
    """A new sweep needs a new or empty run_dir; a resumed one the same run_dir and the same config."""
    run_dir = Path(cfg.run_dir)
    if cfg.resume:
        if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / STATE_FILE).is_file():
            raise ConfigError(f"resume: true, but run_dir {str(run_dir)!r} holds no sweep; allowed: the run_dir of an earlier sweep")
        from hwnas.search.run_folder import check_run_folder, load_run_config

        # The folder is untrusted input: checked targets, no interpolation, its own plugins ignored.
        saved_cfg = load_run_config(run_dir / CONFIG_FILE, tuple(cfg.get("plugins") or ()))
        _pin_fingerprint(cfg, saved_cfg)
        saved = flatten(OmegaConf.to_container(saved_cfg, resolve=True))  # type: ignore[arg-type]
        now = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        differ = sorted(
            k for k in set(saved) | set(now)
            if not _same_setting(saved, now, k) and not k.startswith(RESUMABLE_PREFIXES)
        )
        if differ:
            raise ConfigError(
                f"resume: the config differs from the original run in {', '.join(differ)}; "
                "allowed: changes to runner.*, tracking.* only"
            )
        check_run_folder(run_dir, saved_cfg)  # its records name only its own files (artifacts, pending uploads)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run_dir: {str(run_dir)!r} already holds files; allowed: a new or empty folder, or resume=true")
    return run_dir


ABSENT = object()


def _same_setting(saved: dict[str, Any], now: dict[str, Any], key: str) -> bool:
    """Equal values, or a key the saved run predates whose value now is its off default (null, false, empty):
    a run folder made before a knob existed resumes with that knob off."""
    a, b = saved.get(key, ABSENT), now.get(key, ABSENT)
    if a is ABSENT or b is ABSENT:
        from hwnas.evaluators.compression_options import OFF_DEFAULTS

        other = b if a is ABSENT else a
        if key in OFF_DEFAULTS:  # compression.*: a knob whose off setting is not null (qat_epochs: 0)
            return bool(other == OFF_DEFAULTS[key])
        if key.startswith("scheduler.") and a is ABSENT:  # a run from before schedulers: it trained every trial in full
            return key == "scheduler._target_" and other == "hwnas.search.schedulers.full.FullTraining" or key == "scheduler.latency_first"
        return other is None or other is False or other == [] or other == {}
    return bool(a == b)


def _pin_fingerprint(cfg: DictConfig, saved: DictConfig) -> None:
    """Resuming continues on the data the run was made with: the saved fingerprint is expected of the
    data now (checked when the data is prepared: changed files or split are refused, naming the dataset)."""
    dataset = saved.get("dataset")
    pinned = dataset.get("fingerprint") if isinstance(dataset, DictConfig) else None
    if pinned is not None and "fingerprint" in cfg.dataset and cfg.dataset.fingerprint is None:
        cfg.dataset.fingerprint = pinned


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def data_params(data: dict[str, Any] | None) -> dict[str, Any]:
    """The data's identity and normalisation as parent-run params (data.json holds the rest)."""
    if data is None:
        return {}
    norm = data["normalization"]
    return {
        "data.fingerprint": data["fingerprint"],
        "data.kind": data["kind"],
        "data.input_shape": "x".join(map(str, data["input_shape"])),
        "data.classes": len(data["classes"]),
        **{f"data.{split}_items": n for split, n in data["splits"].items()},
        "data.norm_scale": norm["scale"],
        "data.norm_mean": ",".join(f"{v:.6g}" for v in norm["mean"]),
        "data.norm_std": ",".join(f"{v:.6g}" for v in norm["std"]),
    }


def dataset_input(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The data as an MLflow dataset input (tracking.op_log_dataset): its summary with a short name;
    the fingerprint is the digest, the split sizes the profile."""
    if data is None:
        return None
    summary = {k: v for k, v in data.items() if k != "cache"}
    source = data.get("path") or data.get("module")
    summary["name"] = f"{data['kind']}:{Path(str(source)).name}" if data.get("path") else str(source or data["kind"])
    return summary


def hardware_params(hardware: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The latency target's device and protocol as parent-run params and tags (hardware.json holds all)."""
    if hardware is None:
        return {}, {}
    fp = hardware["fingerprint"]
    params = {
        "device.id": hardware["device_id"],
        "device.cpu": fp.get("cpu_model"),
        "device.arch": fp.get("arch"),
        "device.cores": fp.get("logical_cores"),
        "device.flags": ",".join(fp.get("flags") or []),
        "device.onnxruntime": fp.get("onnxruntime"),
        "device.gpu": (fp.get("gpu") or {}).get("name"),
        "device.os": fp.get("os"),
        **{f"protocol.{k}": v for k, v in hardware["protocol"].items()},
        "protocol.key": hardware["protocol_key"],
        "latency.isolation": hardware["isolation"],
        "latency.predictor": (hardware.get("predictor") or {}).get("path"),
        **{f"format.{fmt}": computes for fmt, computes in (hardware.get("formats") or {}).items()},
    }
    tags = {"device_id": hardware["device_id"], "device_cpu": str(fp.get("cpu_model")),
            "protocol_key": hardware["protocol_key"], "latency_target": hardware["target"]}
    return {k: v for k, v in params.items() if v is not None}, tags


def open_tracking(
    cfg: DictConfig, run_dir: Path, state: SweepState | None, data: dict[str, Any] | None = None,
    hardware: dict[str, Any] | None = None,
) -> tuple[Tracking | None, SweepState]:
    """Start (or, resuming, reopen) the sweep's parent run. Fails here, before any trial, if MLflow is unreachable."""
    study_name = state.study_name if state else cfg.experiment_name
    if not cfg.tracking.enabled:
        return None, state or SweepState(study_name=study_name, parent_run_id=None)
    from hwnas.search.tracking import MlflowStore, Tracking  # imported while Ray starts (cli), not on import

    store = MlflowStore(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.registered_model)
    try:
        if state is not None and state.parent_run_id is not None:
            tracking = Tracking(store, run_dir, state.parent_run_id)
            store.op_set_running(state.parent_run_id)
            return tracking, state
        hw_params, hw_tags = hardware_params(hardware)
        parent = store.create_sweep(
            run_name=run_dir.name,
            params={**flatten(OmegaConf.to_container(cfg, resolve=True)), **data_params(data), **hw_params},  # type: ignore[arg-type]
            tags={"sampler": cfg.search._target_.rsplit(".", 1)[-1], "run_dir": str(run_dir.resolve()),
                  **({"data_fingerprint": data["fingerprint"]} if data else {}), **hw_tags},
        )
    except Exception as exc:
        raise ConfigError(f"tracking.uri: cannot reach MLflow at {cfg.tracking.uri!r} ({type(exc).__name__}); allowed: a reachable server or sqlite:///PATH") from None
    return Tracking(store, run_dir, parent), SweepState(study_name=study_name, parent_run_id=parent)


def reconcile_tracking(tracking: Tracking, rows: list[dict[str, Any]]) -> None:
    """Resuming: child runs the dead driver left RUNNING end as their trials.jsonl record says, or KILLED."""
    by_number = {r["number"]: r for r in rows}
    tracking.flush(force=True)
    for run in tracking.store.children(tracking.parent_id):
        if run.info.status != "RUNNING":
            continue
        number = int(run.data.tags.get("trial", -1))
        row = by_number.get(number)
        if row is None:
            tracking.store.op_end_run(run.info.run_id, "KILLED")
        else:
            tags = {"status": row["status"], "feasible": str(row["feasible"]).lower(), "node": str(row["node"])}
            status = "FAILED" if row["status"] == FAILED else "FINISHED"
            tracking.trial_ended(number, row["candidate"], row["metrics"], tags, row.get("artifact"), status)


def run_sweep(built: Built) -> int:
    """Run (or resume) the sweep; on any stop (done, error, Ctrl-C) keep what finished and end every MLflow run."""
    cfg, sweep = built.cfg, built.sweep
    sweep.run_dir.mkdir(parents=True, exist_ok=True)
    state = SweepState.load(sweep.run_dir) if cfg.resume else None
    tracking, state = open_tracking(cfg, sweep.run_dir, state, built.data, built.hardware)
    if cfg.resume:
        state.resumed_at.append(time.time())
    else:
        state.command = list(built.overrides or [])
        (sweep.run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if built.data is not None:
        (sweep.run_dir / DATA_FILE).write_text(json.dumps(built.data, indent=1))
    if built.hardware is not None:
        (sweep.run_dir / HARDWARE_FILE).write_text(json.dumps(built.hardware, indent=1))
    state.save(sweep.run_dir)
    sweep.study_name = state.study_name
    rows = TrialLog(sweep.run_dir).rows()
    study = sweep.create_study()  # once: the broker's, brought in line with trials.jsonl first when resumed
    sweep.warm_start(study, cfg)  # warm_start=RUN_DIR: a new study begins with an earlier sweep's trials
    if cfg.resume:
        retried = reconcile_study(study, rows, built.objectives)
        if tracking is not None:
            reconcile_tracking(tracking, rows)
        print(f"[hwnas] resuming {sweep.run_dir}: {len(rows)} trials done, {len(retried)} interrupted trial(s) queued again")
    sampler_tag = {"sampler": cfg.search._target_.rsplit(".", 1)[-1]}
    row_fields = {}
    if built.hardware is not None:  # every trial row and child run says which device and protocol
        row_fields = {"device_id": built.hardware["device_id"], "latency_protocol": built.hardware["protocol_key"]}
    dataset = dataset_input(built.data)
    if tracking is not None and dataset is not None:
        tracking.log_dataset(None, dataset)  # the runs table's Dataset column, on the parent run
    from hwnas.search.report import ReportWriter

    report = ReportWriter(sweep.run_dir, built.objectives, title=str(cfg.experiment_name))
    if rows:
        report.update(rows)  # resumed: the report shows what was there before the first new trial ends
    recorder = Recorder(
        sweep.run_dir, built.objectives, tracking, Progress(sweep.n_trials), {**sampler_tag, **row_fields},
        when_no_trial_left_to_start=partial(prepare_export, sweep.evaluator), row_fields=row_fields,
        on_trial_end=report.update, dataset=dataset,
    )
    broker = Broker(study, sweep.space, sweep.objectives, sweep.n_trials, recorder, scheduler=sweep.scheduler)
    status = "FAILED"
    try:
        built.runner.run(sweep, broker)
        recorder.close()
        report.close(write=False)  # the final report is written by finalize, with the export's card
        summary = finalize(sweep.run_dir, cfg, built.objectives, TrialLog(sweep.run_dir).rows(), sweep.evaluator, tracking,
                           ExportRequest(sweep_command=state.command))
        status = "FINISHED"
        print(summary)
        return 0
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"\n[hwnas] interrupted: finished trials are kept in {sweep.run_dir}; resume=true continues", file=sys.stderr)
        return 130
    finally:
        if status != "FINISHED":
            recorder.close()
            # Never lose what finished: the tables (and the report) are written even when the sweep did not end well.
            write_tables(sweep.run_dir, built.objectives, TrialLog(sweep.run_dir).rows())
            report.close()
        if tracking is not None:
            tracking.close(status)
            if tracking.offline:
                print(f"[hwnas] MLflow was unreachable: operations wait in {tracking.pending_path}; run hwnas-sync run_dir={sweep.run_dir}", file=sys.stderr)
