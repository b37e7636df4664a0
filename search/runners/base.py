"""What every runner (`conf/runner/*.yaml`) provides.

A runner places the broker's trials somewhere (in the driver, on Ray workers) and reports how each
ended; everything else about a trial (suggest, de-duplicate, record, tell, track) is the broker's.
Its constructor validates the `runner.*` keys once (ValueError naming the key), before anything starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hwnas.search.broker import Broker
    from hwnas.search.runners.sweep import Sweep


@runtime_checkable
class Runner(Protocol):
    max_concurrent: int  # trials at a time
    trial_timeout_s: float | None  # a trial running longer is stopped and recorded FAILED

    def run(self, sweep: Sweep, broker: Broker) -> None:
        """Until `broker.next()` returns None: start the trial (`broker.started`), evaluate
        `sweep.evaluator` on the candidate in `sweep.trial_dir(number)`, and report the result
        (`broker.finished` / `broker.failed`). Raises KeyboardInterrupt when interrupted.

        A runner that must join resources first (Ray) may also offer `start()`: it is called
        before anything is written, and its ValueError is reported as a config error.
        """
