"""Fault drills on real processes: a Ray worker SIGKILLed mid-trial, and trials past their time limit.

Each sweep is a real `hwnas` subprocess (smoke experiment: generated data, tiny nets) with its own
Ray instance; the worker to kill is found in that instance's process tree (driver -> raylet ->
`ray::ImplicitFunc` trial actor), so no other Ray on the machine is touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
# Trials of a few seconds: long enough to be killed or timed out mid-training, short enough for a test.
SLOW_TRIALS = ("experiment=smoke", "evaluator.epochs=150", "evaluator.finetune_epochs=0")


def hwnas_command(*overrides: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from hwnas.search.cli import main; sys.exit(main())", *overrides]


def hwnas(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hwnas_command(*overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ---- the process tree, from /proc (Linux) ----


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0]


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[0]
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found.extend(kids)
        frontier.extend(kids)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(root: int) -> None:
    """SIGKILL a process this test started and everything under it (its Ray instance included)."""
    for pid in [*reversed(descendants(root)), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(what: Callable[[], T | None], timeout: float, message: str) -> T:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")


def running_trainable(driver: int) -> int | None:
    """The pid of a Ray trial actor of this driver's own Ray instance that is inside a trial."""
    for pid in descendants(driver):
        title = cmdline(pid)
        # Tune runs a function trainable in an `ImplicitFunc` actor; Ray titles it
        # ray::<actor class>.<method> while a method runs, so `.train` = mid-trial.
        if title.startswith("ray::ImplicitFunc.train"):
            return pid
    return None


def children_runs(uri: str, experiment: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow
@pytest.mark.parametrize("max_failures", [0, 1])
def test_worker_killed_mid_trial(tmp_path: Path, max_failures: int) -> None:
    run_dir, uri, n = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db", 3
    log = open(tmp_path / "hwnas.log", "w")
    driver = subprocess.Popen(
        hwnas_command(
            *SLOW_TRIALS, "runner=ray", "runner.max_concurrent=1", f"runner.max_failures={max_failures}",
            f"n_trials={n}", "search=random", f"run_dir={run_dir}", f"tracking.uri={uri}",
        ),
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        victim = wait_for(lambda: running_trainable(driver.pid), 240, "a Ray worker running a trial")
        time.sleep(1.0)  # well inside the trial's training
        done_before = len((run_dir / "trials.jsonl").read_text().splitlines()) if (run_dir / "trials.jsonl").exists() else 0
        os.kill(victim, signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, (tmp_path / "hwnas.log").read_text()[-3000:]
    finally:
        kill_tree(driver.pid)
        log.close()
    assert done_before < n  # the kill hit a trial that was still to be recorded
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and trials["number"].is_unique
    failed = trials[trials["status"] == "FAILED"]
    if max_failures == 0:
        # Not retried: the killed trial is a FAILED row that says why; the others ran normally.
        assert len(failed) == 1, trials[["number", "status", "error"]]
        assert isinstance(failed["error"].iloc[0], str) and failed["error"].iloc[0].strip()
    else:
        assert failed.empty, trials[["number", "status", "error"]]  # the killed trial completed on retry
        assert trials["val_accuracy"].notna().all()
    parents, children = children_runs(uri, "hwnas-smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(c.data.tags["trial"]) for c in children) == sorted(trials["number"])  # one run per trial
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)  # none left RUNNING
    assert sum(c.info.status == "FAILED" for c in children) == len(failed)


def _assert_all_timed_out(run_dir: Path, n: int) -> None:
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n
    assert (trials["status"] == "FAILED").all(), trials[["number", "status", "error"]]
    assert trials["error"].str.contains("TimeoutError").all() and trials["error"].str.contains("time limit").all()


def test_trials_past_their_time_limit_fail_and_the_sweep_ends_well(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = hwnas(
        *SLOW_TRIALS, "evaluator.epochs=100000", "runner=local", "runner.trial_timeout_s=1", "n_trials=2",
        f"run_dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_all_timed_out(run_dir, 2)
    _, children = children_runs(f"sqlite:///{tmp_path}/mlflow.db", "hwnas-smoke")
    assert len(children) == 2 and all(c.info.status == "FAILED" for c in children)
    assert all("time limit" in c.data.tags["error"] for c in children)


@pytest.mark.slow
def test_ray_trials_past_their_time_limit_fail(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = hwnas(
        *SLOW_TRIALS, "evaluator.epochs=100000", "runner=ray", "runner.trial_timeout_s=1", "n_trials=2",
        f"run_dir={run_dir}", "tracking.enabled=false",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_all_timed_out(run_dir, 2)
