"""An evaluator plug-in for fault tests: a table look-up that first notes every attempt on disk.

`hwnas plugins=[counting_evaluator] evaluator._target_=counting_evaluator.CountingTabularEvaluator
+evaluator.attempts=PATH`
(with tests/ on PYTHONPATH, for the driver and, through it, for the Ray workers): each call of
`evaluate` appends its trial folder's name (the trial number) to `attempts` before the look-up,
which raises for a candidate the table has no row for. The file tells how often each trial ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hwnas.evaluators.base import Evaluation
from hwnas.evaluators.tabular import NamedSpace, TabularEvaluator


class CountingTabularEvaluator(TabularEvaluator):
    def __init__(self, table: str, key: str, space: NamedSpace, attempts: str, objectives: Any = None) -> None:
        super().__init__(table, key, space, objectives)
        self.attempts = attempts

    def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Evaluation:
        # One short O_APPEND write per attempt: whole lines even with trials in parallel processes.
        fd = os.open(self.attempts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{Path(trial_dir).name} {self.space.name(candidate)}\n".encode())
        finally:
            os.close(fd)
        return super().evaluate(candidate, trial_dir, deadline)
