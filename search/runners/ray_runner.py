"""Ray Tune runner: Optuna's sampler through `OptunaSearch`, trials as Ray actors, bookkeeping on the driver.

Trials run in worker processes (one per `runner.resources`), so only numbers and file paths travel
back; MLflow, the trial log and the progress line live in the driver (see `Recorder`).

Order of writes when a trial ends: trials.jsonl first, then Optuna's journal (`tell`), then MLflow.
A driver killed between any two is reconciled on resume from trials.jsonl (see study_record).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from search.constraints import set_constraints
from search.dedup import EvaluationRecord, Outcome, remember_study, tell
from search.objectives import Objectives
from search.recorder import Recorder
from search.runners.limits import check_timeout
from search.runners.local_runner import MAX_DUPLICATE_STREAK
from search.runners.ray_trial import ERROR_KEY, NUMBER_KEY, candidate_of, run_trial
from search.runners.sweep import Sweep
from search.study_record import DUPLICATE
from spaces.base import SearchSpace
from spaces.candidate import arch_id

# Ray adds its own bookkeeping to every result; only the evaluator's numbers are trial metrics.
_RAY_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", "checkpoint_dir_name", "should_checkpoint",
}


class _DedupOptunaSearch(OptunaSearch):
    """OptunaSearch that records each trial before telling Optuna, and never evaluates a candidate twice."""

    def __init__(
        self, space: SearchSpace, objectives: Objectives, recorder: Recorder, trials: dict[str, Any], **kwargs: Any
    ) -> None:
        self._hw_space = space
        self._objectives = objectives
        self._recorder = recorder
        self._trials = trials  # trial_id -> Ray Trial, filled by _StartCallback (for error texts)
        self._record = EvaluationRecord(MAX_DUPLICATE_STREAK)
        self._arch_of: dict[str, str] = {}
        super().__init__(space=self._define_by_run, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        remember_study(self._record, self.study)  # a resumed study's history counts too

    def _define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        candidate = self._hw_space.suggest(trial)
        return {**candidate, NUMBER_KEY: trial.number}

    def suggest(self, trial_id: str) -> dict | None:
        while True:
            config = super().suggest(trial_id)
            if config is None:
                return None
            aid = arch_id(candidate_of(config))
            known = self._record.known(aid)
            busy = self._record.is_pending(aid)
            if (known is None and not busy) or self._record.exhausted():
                self._record.start(aid)
                self._arch_of[trial_id] = aid
                return config
            self._record.hit()
            self._recorder.duplicate()
            ot_trial = self._ot_trials.pop(trial_id)
            ot_trial.set_user_attr(DUPLICATE, aid)
            if known is not None:
                tell(self.study, ot_trial, known)
            else:  # same candidate running right now: drop this proposal, its result is on the way
                self.study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        outcome = None
        if ot_trial is not None:
            number, candidate = ot_trial.number, candidate_of(ot_trial.params)
            if result and not result.get(ERROR_KEY) and not error and all(m in result for m in self.metric):
                metrics = {k: float(v) for k, v in result.items() if _is_metric(k, v)}
                self._recorder.finished(number, candidate, metrics, result.get("artifact") or None, result.get("node"))
                outcome = Outcome.of([result[m] for m in self.metric], self._objectives.constraints(metrics))
                # OptunaSearch tells the values below; the samplers read the constraints as it does.
                set_constraints(ot_trial, self.study, outcome.constraints)
            else:
                self._recorder.failed(number, candidate, self._error_of(trial_id, result), (result or {}).get("node"))
                result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)
        aid = self._arch_of.pop(trial_id, None)
        if aid is not None:
            self._record.complete(aid, outcome)

    def _error_of(self, trial_id: str, result: dict | None) -> str:
        if result and result.get(ERROR_KEY):
            return str(result[ERROR_KEY])
        trial = self._trials.get(trial_id)
        try:
            err = trial.get_error() if trial is not None else None
            if err is not None:
                return str(err).strip().splitlines()[-1][:2000]
        except Exception:
            pass
        return "trial ended without reporting its metrics (worker lost)"

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles its search algorithm into the experiment snapshot; the driver-side recorder
        # (threads, MLflow client) stays out of it. The Optuna journal holds the sampler's state.
        return {k: v for k, v in self.__dict__.items() if k not in ("_recorder", "_trials")}

    # The Optuna journal in run_dir is the sampler's state; Ray's pickled copy of it is not needed.
    def save(self, checkpoint_path: str) -> None:
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None

    @property
    def study(self) -> optuna.Study:
        # OptunaSearch creates its study in _setup_study, before any suggest or result.
        assert self._ot_study is not None
        return self._ot_study


class _StartCallback(tune.Callback):
    def __init__(self, recorder: Recorder, trials: dict[str, Any]) -> None:
        self.recorder = recorder
        self.trials = trials

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Ray snapshots its run config; the live driver-side recorder stays out of it

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id] = trial
        self.recorder.started(int(trial.config[NUMBER_KEY]), candidate_of(trial.config))


def _is_metric(key: str, value: Any) -> bool:
    return key not in _RAY_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)


class RayRunner:
    def __init__(
        self,
        *,
        max_concurrent: int,
        resources: dict[str, float],
        address: str | None,
        storage: str | None,
        max_failures: int,
        trial_timeout_s: float | None,
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
        self.storage = storage
        self.max_failures = max_failures
        self.trial_timeout_s = check_timeout(trial_timeout_s)

    def start(self) -> None:
        """Start or join Ray, and check the cluster can keep this sweep's state. Before any trial."""
        # Quiet: the progress line is the sweep's output; Ray's tables and worker logs are not.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # A failed trial reports its error instead of the objectives; the searcher records it FAILED.
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        warnings.filterwarnings("ignore", module="ray")
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = " (a token-authenticated cluster also needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN here)"
                raise ValueError(f"runner.address: cannot join Ray at {self.address!r}: {str(exc).splitlines()[0]}{hint}") from None
        for name in ("ray", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and self.storage is None:
            raise ValueError(
                f"runner.storage: null on a cluster of {len(nodes)} nodes; allowed: a path every node "
                "can read and write (NFS or similar), where trials write their models and Ray its state"
            )
        if self.resources["gpu"] > 0:
            total = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
            if total < self.resources["gpu"]:
                raise ValueError(
                    f"runner.resources.gpu: {self.resources['gpu']} per trial, but the cluster has {total:g} GPUs; allowed: <= {total:g}"
                )

    def run(self, sweep: Sweep, recorder: Recorder) -> optuna.Study:
        self.start()
        root = Path(self.storage).resolve() / sweep.run_dir.resolve().name if self.storage else sweep.run_dir.resolve()
        trials: dict[str, Any] = {}
        searcher = _DedupOptunaSearch(
            sweep.space,
            sweep.objectives,
            recorder,
            trials,
            metric=list(sweep.objectives.names),
            mode=list(sweep.objectives.modes),
            sampler=sweep.sampler,
            study_name=sweep.study_name,
            storage=sweep.storage(),
        )
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                evaluator=sweep.evaluator,
                trials_root=str(root / "trials"),
                threads=max(1, int(self.resources["cpu"])),
                timeout_s=self.trial_timeout_s,
            ),
            self.resources,
        )
        remaining = sweep.n_trials - recorder.done
        if remaining <= 0:
            return optuna.load_study(study_name=sweep.study_name, storage=sweep.storage())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=remaining,
                max_concurrent_trials=self.max_concurrent,
                # A function trainable has no state between trials: reusing the worker process saves
                # the seconds that importing torch + Lightning costs per trial.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(root / "ray"),
                verbose=0,
                callbacks=[_StartCallback(recorder, trials)],
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )
        tuner.fit()
        if recorder.running:
            # Ray Tune catches Ctrl-C itself and returns from fit() with trials cut short.
            raise KeyboardInterrupt
        return searcher.study
