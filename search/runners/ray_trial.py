"""What a Ray worker runs for one trial: evaluate the candidate, report its numbers or its error.

Kept apart from the driver's side (ray_runner.py): Ray ships `run_trial` by reference, so a worker
imports this module and the evaluator's, not the driver's MLflow, Optuna or plotting stacks
(about 1.5 s of start-up per worker on two cores).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import ray
from ray import tune

from hwnas.evaluators.base import Evaluator
from hwnas.search.runners.limits import deadline_after, error_text
from hwnas.search.runners.worker_output import capture_output

NUMBER_KEY = "hwnas.trial"  # the Optuna trial number, passed to the trainable with the candidate
ERROR_KEY = "hwnas_error"


def candidate_of(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != NUMBER_KEY}


def node_name() -> str:
    # Two Ray nodes on one host share its name: the node id tells them apart.
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"


def run_trial(
    config: dict[str, Any], evaluator: Evaluator, trials_root: str, threads: int, timeout_s: float | None
) -> None:
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
            result = evaluator.evaluate(candidate_of(config), trial_dir, deadline=deadline)
    except Exception as exc:  # recorded as a failed trial; the sweep goes on
        tune.report({ERROR_KEY: error_text(exc), "node": node_name()})
        return
    tune.report({**result.metrics, "artifact": result.artifact or "", "node": node_name()})

