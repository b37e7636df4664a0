"""Build a sweep from a validated config, run it, and leave every result on disk and in MLflow."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from search.config import ConfigError
from search.export import finalize
from search.objectives import Objectives
from search.progress import Progress
from search.recorder import Recorder
from search.runners.sweep import Sweep
from search.tracking import MlflowTracker
from search.trial_log import TrialLog

CONFIG_FILE = "config.yaml"


@dataclass
class Built:
    cfg: DictConfig
    sweep: Sweep
    runner: Any
    objectives: Objectives


def _build(group: str, node: DictConfig, **kwargs: Any) -> Any:
    """instantiate(), with a constructor's ValueError turned into a one-line ConfigError for that group."""
    try:
        return instantiate(node, **kwargs)
    except Exception as exc:  # Hydra wraps constructor errors in InstantiationException
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(cause, (ValueError, TypeError, RuntimeError, FileNotFoundError, KeyError)):
            raise ConfigError(text if text.startswith(f"{group}.") or text.startswith(group) else f"{group}: {text}") from None
        raise


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
    latency = _build("hardware", cfg.hardware)
    if hasattr(latency, "check_available"):
        try:
            latency.check_available()
        except RuntimeError as exc:
            raise ConfigError(f"hardware: {exc}") from None
    datamodule = _build("dataset", cfg.dataset)
    evaluator_factory = _build("evaluator", cfg.evaluator)
    offered = {"space": space, "datamodule": datamodule, "latency": latency, "seed": cfg.seed, "objectives": objectives}
    try:
        evaluator = evaluator_factory(**_accepted(evaluator_factory, offered))
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"evaluator: {str(exc).strip().splitlines()[0]}") from None
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
    sweep = Sweep(
        space=space,
        sampler=sampler,
        evaluator=evaluator,
        objectives=objectives,
        n_trials=cfg.n_trials,
        run_dir=Path(cfg.run_dir),
        study_name=cfg.experiment_name,
    )
    return Built(cfg=cfg, sweep=sweep, runner=runner, objectives=objectives)


def prepare_run_dir(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    if cfg.resume:
        raise ConfigError("resume: true is not supported yet; allowed: false (start a new run_dir)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run_dir: {str(run_dir)!r} already holds files; allowed: a new or empty folder")
    return run_dir


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_sweep(built: Built) -> int:
    """Run the sweep; on any stop (done, error, Ctrl-C) write what finished and end every MLflow run."""
    cfg, sweep = built.cfg, built.sweep
    sweep.run_dir.mkdir(parents=True, exist_ok=True)
    (sweep.run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = None
    if cfg.tracking.enabled:
        tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.registered_model)
        container = OmegaConf.to_container(cfg, resolve=True)
        tracker.start_sweep(
            run_name=sweep.run_dir.name,
            params=flatten(container),  # type: ignore[arg-type]
            tags={"sampler": cfg.search._target_.rsplit(".", 1)[-1], "run_dir": str(sweep.run_dir.resolve())},
        )
    sampler_tag = {"sampler": cfg.search._target_.rsplit(".", 1)[-1]}
    recorder = Recorder(sweep.run_dir, built.objectives, tracker, Progress(cfg.n_trials), sampler_tag)
    status = "FAILED"
    try:
        built.runner.run(sweep, recorder)
        recorder.close()
        summary = finalize(sweep.run_dir, cfg, built.objectives, TrialLog(sweep.run_dir).rows(), sweep.evaluator, tracker)
        status = "FINISHED"
        print(summary)
        return 0
    except KeyboardInterrupt:
        status = "KILLED"
        print("\n[hwnas] interrupted: trials that finished are kept in", sweep.run_dir, file=sys.stderr)
        return 130
    finally:
        if status != "FINISHED":
            recorder.close()
            # Never lose what finished: the table is written even when the sweep did not end well.
            from search.export import write_tables

            write_tables(sweep.run_dir, built.objectives, TrialLog(sweep.run_dir).rows())
        if tracker is not None:
            tracker.close("FINISHED" if status == "FINISHED" else status)
