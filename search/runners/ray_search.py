"""The Ray Tune side of a sweep that lives in the driver: Optuna's sampler through `OptunaSearch`,
with every result recorded before Optuna hears of it, and the trial-start hook.

Kept apart from ray_runner.py so that validating a config (which imports RayRunner) does not pay for
importing Ray Tune; the driver imports this module while Ray starts.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from hwnas.search.constraints import set_constraints
from hwnas.search.dedup import EvaluationRecord, Outcome, remember_study, tell
from hwnas.search.objectives import Objectives
from hwnas.search.recorder import Recorder
from hwnas.search.runners.local_runner import MAX_DUPLICATE_STREAK
from hwnas.search.runners.ray_trial import ERROR_KEY, NUMBER_KEY, candidate_of
from hwnas.search.study_record import DUPLICATE
from hwnas.spaces.base import SearchSpace
from hwnas.spaces.candidate import arch_id

# Ray adds its own bookkeeping to every result; only the evaluator's numbers are trial metrics.
_RAY_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", "checkpoint_dir_name", "should_checkpoint",
}


class DedupOptunaSearch(OptunaSearch):
    """OptunaSearch that records each trial before telling Optuna, and never evaluates a candidate twice."""

    def __init__(
        self, space: SearchSpace, objectives: Objectives, recorder: Recorder, trials: dict[str, Any], **kwargs: Any
    ) -> None:
        self._hw_space = space
        self._objectives = objectives
        self._recorder = recorder
        self._trials = trials  # trial_id -> Ray Trial, filled by StartCallback (for error texts)
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


class StartCallback(tune.Callback):
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
