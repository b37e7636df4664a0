"""What a Ray worker runs for one trial: evaluate the candidate, report its numbers or its error.

Kept apart from the driver's side (ray_runner.py): Ray ships `run_trial` by reference, so a worker
imports this module and the evaluator's, not the driver's MLflow, Optuna or plotting stacks
(about 1.5 s of start-up per worker on two cores).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune

from hwnas.evaluators.base import Evaluator, TrialStopped
from hwnas.search.runners.limits import deadline_after, error_text
from hwnas.search.runners.worker_output import capture_output

NUMBER_KEY = "hwnas.trial"  # the Optuna trial number, passed to the trainable with the candidate
ERROR_KEY = "hwnas_error"
EPOCH_KEY = "hwnas_epoch"  # a report made during the trial (0: the untrained file, else a rung epoch)


def candidate_of(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != NUMBER_KEY}


def node_name() -> str:
    # Two Ray nodes on one host share its name: the node id tells them apart.
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"


class TuneReporter:
    """A trial's reports to the driver through Tune: `tune.report` blocks until the driver's scheduler
    (ray_search.BrokerScheduler) has decided. CONTINUE returns here; STOP ends this thread inside
    `tune.report` (Ray's function trainable exits it), after the driver recorded the trial."""

    def __init__(self, rungs: Sequence[int]) -> None:
        self.rungs = tuple(rungs)

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        tune.report({**metrics, EPOCH_KEY: epoch, "node": node_name()})
        return True


def run_trial(
    config: dict[str, Any], evaluator: Evaluator, trials_root: str, threads: int, timeout_s: float | None,
    rungs: Sequence[int] | None = None,
) -> None:
    """`rungs` None: no reporter (no scheduler, or none that applies); else the scheduler's rung epochs."""
    deadline = deadline_after(timeout_s)
    # The trial's CPUs, for whatever the evaluator runs; torch is not imported for it (a table
    # look-up never needs torch), it reads OMP_NUM_THREADS when the evaluator imports it.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    number = int(config[NUMBER_KEY])
    trial_dir = Path(trials_root) / f"{number:04d}"
    try:
        # The worker's prints, warnings and log records (Lightning's), and a failure's traceback, in
        # trials/<n>/log.txt: Ray does not send them to the driver (log_to_driver=False).
        with capture_output(trial_dir):
            report = {"report": TuneReporter(rungs)} if rungs is not None and getattr(evaluator, "reports_epochs", False) else {}
            result = evaluator.evaluate(candidate_of(config), trial_dir, deadline=deadline, **report)
    except TrialStopped:
        return  # the driver stopped it (only a reporter that answers False raises this here)
    except Exception as exc:  # recorded as a failed trial; the sweep goes on
        tune.report({ERROR_KEY: error_text(exc), "node": node_name()})
        return
    tune.report({**result.metrics, "artifact": result.artifact or "", "node": node_name()})

