"""The driver's bookkeeping: end-of-sweep work starts exactly when no further trial will start."""

from __future__ import annotations

import io
import threading
from pathlib import Path

from hwnas.search.objectives import Objectives
from hwnas.search.progress import Progress
from hwnas.search.recorder import Recorder

OBJECTIVES = Objectives(names=("acc", "lat"), modes=("max", "min"))


def test_end_of_sweep_work_starts_once_no_trial_is_left_to_start(tmp_path: Path) -> None:
    fired = threading.Event()
    calls: list[int] = []

    def work() -> None:
        calls.append(1)
        fired.set()

    rec = Recorder(
        tmp_path, OBJECTIVES, None, Progress(4, stream=io.StringIO()), {},
        when_no_trial_left_to_start=work,
    )
    for n in (0, 1):
        rec.started(n, {"x": n})
    rec.finished(0, {"x": 0}, {"acc": 0.5, "lat": 1.0}, None, None)  # 1 done + 1 running: 2 still to start
    rec.started(2, {"x": 2})
    rec.finished(1, {"x": 1}, {"acc": 0.6, "lat": 2.0}, None, None)  # 2 done + 1 running: 1 still to start
    assert not fired.is_set()
    rec.started(3, {"x": 3})
    rec.failed(2, {"x": 2}, "boom", None)  # 3 done + 1 running: nothing left to start, a slot is free
    assert fired.wait(5)
    rec.finished(3, {"x": 3}, {"acc": 0.7, "lat": 3.0}, None, None)
    rec.close()
    assert calls == [1]
