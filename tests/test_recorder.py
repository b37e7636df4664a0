"""The driver's bookkeeping: end-of-sweep work runs once, in the background, when the broker says no trial is left to start."""

from __future__ import annotations

import io
import threading
from pathlib import Path

from hwnas.search.objectives import Objectives
from hwnas.search.progress import Progress
from hwnas.search.recorder import Recorder

OBJECTIVES = Objectives(names=("acc", "lat"), modes=("max", "min"))


def test_end_of_sweep_work_runs_once_in_the_background(tmp_path: Path) -> None:
    release = threading.Event()
    calls: list[int] = []

    def work() -> None:
        calls.append(1)
        release.wait(5)

    rec = Recorder(
        tmp_path, OBJECTIVES, None, Progress(2, stream=io.StringIO()), {},
        when_no_trial_left_to_start=work,
    )
    rec.started(0, {"x": 0})
    rec.finished(0, {"x": 0}, {"acc": 0.5, "lat": 1.0}, None, None)
    assert calls == []  # the recorder does not count trials: the broker tells it when
    rec.no_trial_left_to_start()  # returns at once: the work runs beside the last trial
    rec.no_trial_left_to_start()
    release.set()
    rec.close()  # waits for the work
    assert calls == [1]
    assert [r["number"] for r in rec.rows] == [0]
