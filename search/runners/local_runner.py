"""In-process runner: the broker's trials evaluated one after another in the driver. No Ray, no processes.

Thousands of table look-ups take seconds. The benchmarks of the samplers drive a broker through the
same loop (`run_in_process`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hwnas.evaluators.base import Evaluation, TrialStopped
from hwnas.search.broker import Broker
from hwnas.search.runners.limits import check_timeout, deadline_after, error_text
from hwnas.search.runners.sweep import Sweep
from hwnas.search.runners.worker_output import capture_output

Evaluate = Callable[[int, dict[str, Any]], Evaluation]


def run_in_process(broker: Broker, evaluate: Evaluate, node: str | None = None) -> int:
    """Evaluate what the broker hands out until nothing is left to start; return the evaluations made.

    `evaluate(number, candidate)` returns the measured numbers or raises: the trial is recorded
    FAILED and the loop goes on; TrialStopped: the scheduler ended it, and the broker has recorded it.
    """
    made = 0
    while (job := broker.next()) is not None:
        number, candidate = job
        broker.started(number)
        made += 1
        try:
            result = evaluate(number, candidate)
        except TrialStopped:
            continue
        except Exception as exc:  # a failed candidate is a result, not the end of the sweep
            broker.failed(number, error_text(exc), node)
            continue
        broker.finished(number, result.metrics, result.artifact, node)
    return made


@dataclass
class BrokerReporter:
    """A trial's reports straight to the broker (in the driver's process): its decision is the answer."""

    broker: Broker
    number: int
    node: str | None
    rungs: tuple[int, ...]

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        return self.broker.report(self.number, epoch, metrics, self.node)


def report_kwargs(evaluator: Any, reporter: Any) -> dict[str, Any]:
    """`report=` for an evaluator that takes it (reports_epochs), when the sweep has a reporter."""
    return {"report": reporter} if reporter is not None and getattr(evaluator, "reports_epochs", False) else {}


class LocalRunner:
    def __init__(self, *, max_concurrent: int, trial_timeout_s: float | None) -> None:
        if max_concurrent != 1:
            raise ValueError(f"runner.max_concurrent: {max_concurrent} with runner=local; allowed: 1 (use runner=ray for parallel trials)")
        self.max_concurrent = max_concurrent
        self.trial_timeout_s = check_timeout(trial_timeout_s)

    def run(self, sweep: Sweep, broker: Broker) -> None:
        node = socket.gethostname()

        def evaluate(number: int, candidate: dict[str, Any]) -> Evaluation:
            trial_dir = sweep.trial_dir(number)
            reporter = BrokerReporter(broker, number, node, broker.rungs) if broker.reports else None
            # The trial's output to trials/<n>/log.txt; only this thread's: the driver's progress line
            # and tracking threads share the process and keep their streams.
            with capture_output(trial_dir, all_threads=False):
                return sweep.evaluator.evaluate(candidate, trial_dir, deadline=deadline_after(self.trial_timeout_s),
                                                **report_kwargs(sweep.evaluator, reporter))

        run_in_process(broker, evaluate, node)
