"""The Ray Tune side of a sweep that lives in the driver: a Tune `Searcher` that hands out the
broker's trials and reports how they ended, and the trial-start hook.

Only Ray's public Searcher / Callback API is used; the broker does everything else (suggest,
de-duplicate, record, tell, track), exactly as for runner=local.

Kept apart from ray_runner.py so that validating a config (which imports RayRunner) does not pay for
importing Ray Tune; the driver imports this module while Ray starts.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from hwnas.search.broker import Broker
from hwnas.search.runners.ray_trial import EPOCH_KEY, ERROR_KEY, NUMBER_KEY

# Ray adds its own bookkeeping to every result; only the evaluator's numbers are trial metrics.
_RAY_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "time_since_restore",
    "iterations_since_restore", "done", "node_ip", "checkpoint_dir_name", "should_checkpoint",
}


class BrokerSearcher(Searcher):
    """Tune's source of trials: the broker's next candidate, or FINISHED when nothing is left to start."""

    def __init__(self, broker: Broker, trials: dict[str, Any]) -> None:
        super().__init__()
        self._broker = broker
        self._trials = trials  # trial_id -> Ray Trial, filled by StartCallback (for error texts)
        self._numbers: dict[str, int] = {}  # Ray trial_id -> Optuna trial number

    def suggest(self, trial_id: str) -> dict | None:
        job = self._broker.next()
        if job is None:
            # Tune starts no further trial and ends when the running ones do (Ray types suggest's
            # return as a dict or None, though it documents and handles this string).
            return Searcher.FINISHED  # type: ignore[return-value]
        number, candidate = job
        self._numbers[trial_id] = number
        return {**candidate, NUMBER_KEY: number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._numbers.pop(trial_id, None)
        if number is None:
            return
        node = (result or {}).get("node")
        if result and not result.get(ERROR_KEY) and not error and all(m in result for m in self._broker.objectives.names):
            metrics = {k: float(v) for k, v in result.items() if _is_metric(k, v)}
            self._broker.finished(number, metrics, result.get("artifact") or None, node)
        else:
            self._broker.failed(number, self._error_of(trial_id, result), node)

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
        # Ray pickles its search algorithm into the experiment snapshot; the driver-side broker
        # (study, recorder: threads, MLflow client) stays out of it.
        return {k: v for k, v in self.__dict__.items() if k not in ("_broker", "_trials")}

    # The Optuna journal in run_dir is the sampler's state; a resume never loads Ray's pickles.
    def save(self, checkpoint_path: str) -> None:
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None


class BrokerScheduler(FIFOScheduler):
    """Tune's trial scheduler for a sweep: a trial's report made during training (EPOCH_KEY: its untrained
    file, or a rung) goes to the broker, whose scheduler (search/schedulers/) decides; STOP ends the trial
    (the broker has recorded it REJECTED or STOPPED). Every other result is Tune's FIFO: continue."""

    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self._broker = broker

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if EPOCH_KEY not in result:
            return TrialScheduler.CONTINUE
        metrics = {k: float(v) for k, v in result.items() if k != EPOCH_KEY and _is_metric(k, v)}
        keep = self._broker.report(int(trial.config[NUMBER_KEY]), int(result[EPOCH_KEY]), metrics, result.get("node"))
        return TrialScheduler.CONTINUE if keep else TrialScheduler.STOP

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_broker"}  # the live broker stays in the driver


class StartCallback(tune.Callback):
    def __init__(self, broker: Broker, trials: dict[str, Any]) -> None:
        self.broker = broker
        self.trials = trials

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Ray snapshots its run config; the live driver-side broker stays out of it

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id] = trial
        self.broker.started(int(trial.config[NUMBER_KEY]))


def _is_metric(key: str, value: Any) -> bool:
    # Tune flattens the trial's config into the result as config/<param>: parameters, not metrics.
    return (key not in _RAY_KEYS and not key.startswith("config/") and isinstance(value, (int, float))
            and not isinstance(value, bool))
