"""Ray Tune runner: Optuna's sampler through `OptunaSearch`, trials as Ray actors, bookkeeping on the driver.

Trials run in worker processes (one per `runner.resources`), so only numbers and file paths travel
back; MLflow, the trial log and the progress line live in the driver (see `Recorder`).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from evaluators.base import Evaluator
from search.dedup import EvaluationRecord
from search.recorder import Recorder
from search.runners.local_runner import MAX_DUPLICATE_STREAK
from search.runners.sweep import Sweep
from spaces.base import SearchSpace
from spaces.candidate import arch_id

NUMBER_KEY = "hwnas.trial"  # the Optuna trial number, passed to the trainable with the candidate
ERROR_KEY = "hwnas_error"


class _DedupOptunaSearch(OptunaSearch):
    """OptunaSearch that answers already-evaluated (or in-flight) candidates without running them."""

    def __init__(self, space: SearchSpace, **kwargs: Any) -> None:
        self._hw_space = space
        self._record = EvaluationRecord(MAX_DUPLICATE_STREAK)
        self._arch_of: dict[str, str] = {}
        super().__init__(space=self._define_by_run, **kwargs)

    def _define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        candidate = self._hw_space.suggest(trial)
        return {**candidate, NUMBER_KEY: trial.number}

    def suggest(self, trial_id: str) -> dict | None:
        while True:
            config = super().suggest(trial_id)
            if config is None:
                return None
            aid = arch_id({k: v for k, v in config.items() if k != NUMBER_KEY})
            known = self._record.known(aid)
            busy = self._record.is_pending(aid)
            if (known is None and not busy) or self._record.exhausted():
                self._record.start(aid)
                self._arch_of[trial_id] = aid
                return config
            self._record.hit()
            ot_trial = self._ot_trials.pop(trial_id)
            if known is not None:
                self._ot_study.tell(ot_trial, list(known))
            else:  # same candidate running right now: drop this proposal, its result is on the way
                ot_trial.set_user_attr("duplicate_of_running", aid)
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and result.get(ERROR_KEY):
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)
        aid = self._arch_of.pop(trial_id, None)
        if aid is not None:
            values = None
            if result is not None and not error:
                metrics = self.metric if isinstance(self.metric, list) else [self.metric]
                values = [result[m] for m in metrics]
            self._record.complete(aid, values)

    def trial_number(self, trial_id: str) -> int:
        return self._ot_trials[trial_id].number

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


def _trainable(config: dict[str, Any], evaluator: Evaluator, trials_root: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    number = int(config[NUMBER_KEY])
    candidate = {k: v for k, v in config.items() if k != NUMBER_KEY}
    trial_dir = Path(trials_root) / f"{number:04d}"
    node = socket.gethostname()
    try:
        result = evaluator.evaluate(candidate, trial_dir)
    except Exception as exc:  # recorded as a failed trial; the sweep goes on
        from search.runners.local_runner import error_text

        tune.report({ERROR_KEY: error_text(exc), "node": node})
        return
    tune.report({**result.metrics, "artifact": result.artifact or "", "node": node})


class _RecorderCallback(tune.Callback):
    def __init__(self, searcher: _DedupOptunaSearch, recorder: Recorder) -> None:
        self.searcher = searcher
        self.recorder = recorder

    @staticmethod
    def _candidate(trial: Any) -> dict[str, Any]:
        return {k: v for k, v in trial.config.items() if k != NUMBER_KEY}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.recorder.started(int(trial.config[NUMBER_KEY]), self._candidate(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = dict(trial.last_result or {})
        number = int(trial.config[NUMBER_KEY])
        node = result.get("node")
        if result.get(ERROR_KEY):
            self.recorder.failed(number, self._candidate(trial), str(result[ERROR_KEY]), node)
            return
        metrics = {k: float(v) for k, v in result.items() if _is_metric(k, v)}
        self.recorder.finished(number, self._candidate(trial), metrics, result.get("artifact") or None, node)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = "worker failed"
        try:
            err = trial.get_error()
            if err is not None:
                error = str(err).strip().splitlines()[-1][:2000]
        except Exception:
            pass
        self.recorder.failed(int(trial.config[NUMBER_KEY]), self._candidate(trial), error, None)


# Ray adds its own bookkeeping to every result; only the evaluator's numbers are trial metrics.
_RAY_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", "checkpoint_dir_name", "should_checkpoint",
}


def _is_metric(key: str, value: Any) -> bool:
    return key not in _RAY_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)


class RayRunner:
    def __init__(
        self,
        *,
        max_concurrent: int,
        resources: dict[str, float],
        address: str | None,
        max_failures: int,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"runner.max_concurrent: {max_concurrent} is not allowed; allowed: an integer >= 1")
        unknown = set(resources) - {"cpu", "gpu"}
        if unknown:
            raise ValueError(f"runner.resources.{sorted(unknown)[0]}: unknown resource; allowed: cpu, gpu")
        if float(resources.get("cpu", 1)) <= 0 or float(resources.get("gpu", 0)) < 0:
            raise ValueError(f"runner.resources: {dict(resources)} is not allowed; allowed: cpu > 0, gpu >= 0")
        if max_failures < 0:
            raise ValueError(f"runner.max_failures: {max_failures} is not allowed; allowed: an integer >= 0")
        self.max_concurrent = max_concurrent
        self.resources = {"cpu": float(resources.get("cpu", 1)), "gpu": float(resources.get("gpu", 0))}
        self.address = address
        self.max_failures = max_failures

    def _init_ray(self) -> None:
        # Quiet: the progress line is the sweep's output; Ray's tables and worker logs are not.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        warnings.filterwarnings("ignore", module="ray")
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=True,
            )
        for name in ("ray", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def run(self, sweep: Sweep, recorder: Recorder) -> optuna.Study:
        self._init_ray()
        searcher = _DedupOptunaSearch(
            sweep.space,
            metric=list(sweep.objectives.names),
            mode=list(sweep.objectives.modes),
            sampler=sweep.sampler,
            study_name=sweep.study_name,
        )
        trainable = tune.with_resources(
            tune.with_parameters(
                _trainable,
                evaluator=sweep.evaluator,
                trials_root=str((sweep.run_dir / "trials").resolve()),
                threads=max(1, int(self.resources["cpu"])),
            ),
            self.resources,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=sweep.n_trials - recorder.done,
                max_concurrent_trials=self.max_concurrent,
                # A function trainable has no state between trials: reusing the worker process saves
                # the seconds that importing torch + Lightning costs per trial.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str((sweep.run_dir / "ray").resolve()),
                verbose=0,
                callbacks=[_RecorderCallback(searcher, recorder)],
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )
        tuner.fit()
        return searcher.study
