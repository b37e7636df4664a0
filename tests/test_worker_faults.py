"""Fault drills on real processes: a Ray worker SIGKILLed mid-trial, and trials past their time limit.

Each sweep is a real `hwnas` subprocess (smoke experiment: generated data, tiny nets) with its own
Ray instance; the worker to kill is found in that instance's process tree (driver -> raylet ->
`ray::ImplicitFunc` trial actor), so no other Ray on the machine is touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pytest
from conftest import (
    NB201_METRICS,
    NB201_OPS,
    ROOT,
    TESTS,
    hwnas,
    hwnas_command,
    make_nb201_table,
    nb201_cells,
    output_of,
    read_jsonl,
)
from conftest import mlflow_runs as children_runs

from hwnas.spaces.nb201 import EDGE_KEYS, to_arch_string

T = TypeVar("T")
# Trials of a few seconds: long enough to be killed or timed out mid-training, short enough for a test.
SLOW_TRIALS = ("experiment=smoke", "evaluator.epochs=150", "evaluator.finetune_epochs=0")


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


@pytest.mark.slow
@pytest.mark.parametrize("max_failures", [0, 1])
def test_worker_killed_mid_trial(tmp_path: Path, max_failures: int) -> None:
    run_dir, uri, n = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db", 2
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
    assert proc.returncode == 0, output_of(proc)
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
    assert proc.returncode == 0, output_of(proc)
    _assert_all_timed_out(run_dir, 2)


def test_a_trial_that_raises_is_failed_at_once_and_not_retried(tmp_path: Path) -> None:
    """Through Ray, which retries trials whose worker dies (runner.max_failures=2): a trial whose
    evaluator raises is FAILED with the error, after exactly one attempt, and the sweep goes on."""
    n = 8
    # The table lacks every cell whose first edge is skip_connect: half the space raises on look-up.
    missing = {to_arch_string(c) for c in nb201_cells() if c[EDGE_KEYS[0]] == "skip_connect"}
    table = tmp_path / "t.csv"
    frame = make_nb201_table(table, without=missing).set_index("arch")
    attempts, run_dir = tmp_path / "attempts.txt", tmp_path / "run"
    proc = hwnas(
        "experiment=nb201_tabular", f"space.ops=[{','.join(NB201_OPS)}]", f"evaluator.table={table}", NB201_METRICS,
        "plugins=[counting_evaluator]", "evaluator._target_=counting_evaluator.CountingTabularEvaluator",
        f"+evaluator.attempts={attempts}",
        "runner=ray", "runner.max_concurrent=2", "runner.max_failures=2", "search=random", "seed=0",
        f"n_trials={n}", f"run_dir={run_dir}", "tracking.enabled=false",
        env={"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)},
    )
    assert proc.returncode == 0, output_of(proc)

    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and trials["number"].is_unique
    arch = {int(t["number"]): to_arch_string({k: t[k] for k in EDGE_KEYS}) for _, t in trials.iterrows()}
    failed = trials[trials["status"] == "FAILED"]
    # FAILED exactly where the table has no row, with the evaluator's error; COMPLETE everywhere else.
    assert {int(x) for x in failed["number"]} == {k for k, a in arch.items() if a in missing}
    assert 0 < len(failed) < n, trials[["number", "status", "error"]]  # the sweep went on past them
    for _, t in failed.iterrows():
        assert "is not in table" in t["error"] and arch[int(t["number"])] in t["error"], t["error"]
    for _, t in trials[trials["status"] == "COMPLETE"].iterrows():
        assert t["acc"] == frame.loc[arch[int(t["number"])], "acc"]
    for row in read_jsonl(run_dir / "trials.jsonl"):  # the durable record says the same
        assert (row["status"] == "FAILED") == (arch[row["number"]] in missing)
        assert (row["error"] is not None) == (row["status"] == "FAILED")

    # Each trial ran exactly once: no retry of the ones that raised (nor a second look-up of any).
    lines = [line.split() for line in attempts.read_text().splitlines()]
    assert Counter(int(folder) for folder, _ in lines) == Counter(arch.keys())
    assert all(arch[int(folder)] == name for folder, name in lines)
