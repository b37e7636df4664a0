"""The progress line: done / running / failed, elapsed, and an ETA from this session's pace."""

from __future__ import annotations

import io
import time

from hwnas.search.progress import Progress, _clock


def make(total: int, state: list[tuple[int, int, int, int, str]], **kw: float) -> tuple[Progress, io.StringIO]:
    out = io.StringIO()  # not a terminal: one line per change
    p = Progress(total, stream=out, **kw)
    p._snapshot = lambda: state[-1]
    return p, out


def test_eta_follows_the_pace_of_this_session_only() -> None:
    state = [(4, 2, 0, 0, "-")]  # resumed: 4 trials were done before this session started
    p, out = make(10, state)
    p.start = time.monotonic() - 100
    p.render()
    assert out.getvalue().splitlines()[-1].endswith("ETA -")  # nothing finished yet in this session
    state.append((6, 2, 0, 1, "val_accuracy=0.9"))  # 2 finished in 100 s: 4 left -> ~200 s
    p.render()
    last = out.getvalue().splitlines()[-1]
    assert "6/10 done" in last and "1m40s elapsed" in last and "ETA 3m20s" in last
    state.append((10, 0, 1, 2, "val_accuracy=0.95"))
    p.render()
    assert out.getvalue().splitlines()[-1].endswith("ETA 0s")


def test_a_log_file_gets_a_line_per_change_or_heartbeat() -> None:
    state = [(1, 1, 0, 0, "-")]
    p, out = make(5, state, heartbeat_s=3600)
    p.render()
    p.render()  # nothing changed, no heartbeat due: no new line
    assert len(out.getvalue().splitlines()) == 1
    p.heartbeat_s = 0.0
    p.render()  # unchanged, but the heartbeat is due: the clock moves on in the log too
    assert len(out.getvalue().splitlines()) == 2


def test_clock_reads_at_a_glance() -> None:
    assert [_clock(s) for s in (0, 12.4, 65, 3599, 3720)] == ["0s", "12s", "1m05s", "59m59s", "1h02m"]
