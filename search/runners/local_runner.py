"""In-process runner: the broker's trials evaluated one after another in the driver. No Ray, no processes.

Thousands of table look-ups take seconds. The benchmarks of the samplers drive a broker through the
same loop (`run_in_process`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from hwnas.evaluators.base import Evaluation
from hwnas.search.broker import Broker
from hwnas.search.runners.limits import check_timeout, deadline_after, error_text
from hwnas.search.runners.sweep import Sweep
from hwnas.search.runners.worker_output import capture_output

Evaluate = Callable[[int, dict[str, Any]], Evaluation]


def run_in_process(broker: Broker, evaluate: Evaluate, node: str | None = None) -> int:
    """Evaluate what the broker hands out until nothing is left to start; return the evaluations made.

    `evaluate(number, candidate)` returns the measured numbers or raises: the trial is recorded
    FAILED and the loop goes on.
    """
    made = 0
    while (job := broker.next()) is not None:
        number, candidate = job
        broker.started(number)
        made += 1
        try:
            result = evaluate(number, candidate)
        except Exception as exc:  # a failed candidate is a result, not the end of the sweep
            broker.failed(number, error_text(exc), node)
            continue
        broker.finished(number, result.metrics, result.artifact, node)
    return made


class LocalRunner:
    def __init__(self, *, max_concurrent: int, trial_timeout_s: float | None) -> None:
        if max_concurrent != 1:
            raise ValueError(f"runner.max_concurrent: {max_concurrent} with runner=local; allowed: 1 (use runner=ray for parallel trials)")
        self.max_concurrent = max_concurrent
        self.trial_timeout_s = check_timeout(trial_timeout_s)

    def run(self, sweep: Sweep, broker: Broker) -> None:
        def evaluate(number: int, candidate: dict[str, Any]) -> Evaluation:
            trial_dir = sweep.trial_dir(number)
            # The trial's output to trials/<n>/log.txt; only this thread's: the driver's progress line
            # and tracking threads share the process and keep their streams.
            with capture_output(trial_dir, all_threads=False):
                return sweep.evaluator.evaluate(candidate, trial_dir, deadline=deadline_after(self.trial_timeout_s))

        run_in_process(broker, evaluate, socket.gethostname())
