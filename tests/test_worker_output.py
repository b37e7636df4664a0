"""A trial's output lands in trials/<n>/log.txt (search/runners/worker_output.py), the driver's does not.

Unit tests drive capture_output with real print / warnings / logging (Lightning's logger included);
the end-to-end test runs a real sweep (local; Ray, slow) through the command line with a space plug-in that
prints, warns, logs and fails once, and reads every trial's log.txt and the command's own output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

import pytest
from conftest import hwnas, output_of, read_jsonl

from hwnas.search.runners.worker_output import LOG_NAME, capture_output


def test_prints_warnings_and_log_records_go_to_the_log_and_everything_is_restored(tmp_path: Path, capsys) -> None:
    before = (sys.stdout, sys.stderr, warnings.showwarning, list(logging.getLogger().handlers))
    with capture_output(tmp_path) as path:
        print("to stdout")
        print("to stderr", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a warned thing", UserWarning, stacklevel=1)
        logging.getLogger("some.library").warning("a logged thing %d", 42)
        logging.getLogger("some.library").info("below the root's level: dropped")
    assert path == tmp_path / LOG_NAME
    text = path.read_text()
    for needle in ("to stdout\n", "to stderr\n", "UserWarning: a warned thing", "WARNING some.library: a logged thing 42"):
        assert needle in text
    assert "dropped" not in text
    assert (sys.stdout, sys.stderr, warnings.showwarning, list(logging.getLogger().handlers)) == before
    out = capsys.readouterr()
    assert "to stdout" not in out.out and "to stderr" not in out.err
    print("after")  # restored: the test's own stream again
    assert capsys.readouterr().out == "after\n" and "after" not in path.read_text()


def test_a_failure_is_written_with_its_traceback_and_raised_unchanged(tmp_path: Path) -> None:
    def deep() -> None:
        raise FloatingPointError("non-finite training loss nan in epoch 3")

    before = (sys.stdout, sys.stderr, warnings.showwarning, list(logging.getLogger().handlers))
    with pytest.raises(FloatingPointError, match="epoch 3"), capture_output(tmp_path):
        print("started")
        deep()
    text = (tmp_path / LOG_NAME).read_text()
    assert text.startswith("started\n")
    assert "Traceback (most recent call last)" in text and "in deep" in text
    assert text.rstrip().endswith("FloatingPointError: non-finite training loss nan in epoch 3")
    assert (sys.stdout, sys.stderr, warnings.showwarning, list(logging.getLogger().handlers)) == before


def test_the_log_is_appended_line_by_line_and_not_made_for_a_silent_trial_without_a_folder(tmp_path: Path) -> None:
    trial = tmp_path / "0003"
    with capture_output(trial):
        pass  # a table look-up: no folder, no output, so no file is left behind
    assert not trial.exists()
    with capture_output(trial) as path:
        print("first", flush=False)
        assert path.read_text() == "first\n"  # already on disk while the trial runs
    with capture_output(trial) as path:
        print("second")
    assert path.read_text() == "first\nsecond\n"
    made = tmp_path / "0004"
    with capture_output(made) as path:
        made.mkdir()  # the evaluator wrote files: the trial gets its log, empty as it said nothing
    assert path.read_text() == ""


def test_lightnings_own_logger_is_captured(tmp_path: Path) -> None:
    import pytorch_lightning  # noqa: F401  (sets its logger up as it does in a worker)

    logger = logging.getLogger("pytorch_lightning")
    with capture_output(tmp_path) as path:
        logger.warning("lightning says something at WARNING")
    assert "WARNING pytorch_lightning: lightning says something at WARNING" in path.read_text()
    assert all(not isinstance(h, logging.Handler) or h.__class__.__name__ != "_LogHandler" for h in logger.handlers)


def test_only_the_trials_thread_with_all_threads_false(tmp_path: Path, capsys) -> None:
    def driver_thread() -> None:
        print("[hwnas] progress from another thread")
        logging.getLogger("driver").warning("driver record")

    with capture_output(tmp_path, all_threads=False) as path:
        print("trial line")
        other = threading.Thread(target=driver_thread)
        other.start()
        other.join()
    text = path.read_text()
    assert "trial line" in text
    assert "progress from another thread" not in text and "driver record" not in text
    assert "[hwnas] progress from another thread" in capsys.readouterr().out


# ---- a real sweep ----

NOISY_SPACE = '''
import logging
import os
import sys
import warnings
from pathlib import Path

from hwnas.spaces.macro_cnn import MacroCNNSpace


class NoisySpace(MacroCNNSpace):
    """Says something on every channel a trial has while it builds; the first trial to build fails."""

    def build(self, candidate, input_shape, num_classes):
        print("noisy build on stdout")
        print("noisy build on stderr", file=sys.stderr)
        warnings.warn("noisy build warns", UserWarning, stacklevel=1)
        logging.getLogger("noisy").warning("noisy build logs")
        marker = Path(os.environ["NOISY_MARKER"])
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("noisy build fails on purpose")
        return super().build(candidate, input_shape, num_classes)
'''


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_sweep_keeps_each_trials_output_in_its_folder_and_the_progress_line_out(tmp_path: Path, runner: str) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "noisy_space.py").write_text(NOISY_SPACE)
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")])),
           "NOISY_MARKER": str(tmp_path / "failed_once")}
    proc = hwnas(
        "experiment=smoke", f"runner={runner}", "n_trials=3", "space.quant=[fp32]", "space.prune_ratios=[0.0]",
        "evaluator.epochs=1", "evaluator.finetune_epochs=0", "hardware.repeats=5", "hardware.block_ms=0.5",
        "plugins=[noisy_space]", "space._target_=noisy_space.NoisySpace", f"run_dir={run_dir}",
        "tracking.enabled=false", f"hardware.cache={tmp_path / 'latency.sqlite'}", env=env, timeout=300,
    )
    assert proc.returncode == 0, output_of(proc)
    # The driver still prints its progress lines, on its own stream.
    assert "[hwnas]" in proc.stdout and " done | " in proc.stdout
    assert "noisy build" not in proc.stdout + proc.stderr, output_of(proc)

    rows = {int(r["number"]): r for r in read_jsonl(run_dir / "trials.jsonl") if "number" in r}
    assert len(rows) == 3, rows
    failed = [n for n, r in rows.items() if r.get("state") == "FAIL" or r.get("error")]
    assert len(failed) == 1, json.dumps(rows, default=str)[:2000]
    for number in rows:
        text = (run_dir / "trials" / f"{number:04d}" / LOG_NAME).read_text()
        for needle in ("noisy build on stdout", "noisy build on stderr", "UserWarning: noisy build warns",
                       "WARNING noisy: noisy build logs"):
            assert needle in text, (number, text)
        assert "[hwnas]" not in text and " done | " not in text, (number, text)
        if number in failed:
            assert "Traceback (most recent call last)" in text and "RuntimeError: noisy build fails on purpose" in text
            assert "\n" not in rows[number]["error"]  # the row keeps its one-line error
        else:
            assert "Traceback" not in text
