"""A real MLflow tracking server goes away mid-sweep and comes back: nothing is lost or logged twice.

The server is an `mlflow server` subprocess (SQLite store, artifacts proxied by the server) in its
own process group, stopped with SIGKILL after the first trials, and restarted on the same port and
store either while the sweep still runs or after it ended (then `hwnas-sync` uploads the rest).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hwnas.search.tracking import PENDING_FILE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MLFLOW = str(Path(sys.executable).parent / "mlflow")
N_TRIALS = 6
SWEEP = ("experiment=smoke", "runner=local", f"n_trials={N_TRIALS}", "search=random")
# Trials of several seconds when the server (about 10 s to start) must be back while the sweep still
# runs; shorter ones when it comes back after the sweep (they need only outlast the kill).
EPOCHS = {"during_sweep": 200, "after_sweep": 30}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`mlflow server` on a fixed port and store, which can be killed and started again."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/server.db", "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: its workers die with it
        )
        log.close()
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert self.proc.poll() is None, (self.root / "server.log").read_text(errors="replace")[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not answer on {self.uri} within 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test created, and nothing else
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path, free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def recorded(run_dir: Path) -> int:
    path = run_dir / "trials.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_recorded(run_dir: Path, n: int, sweep: subprocess.Popen[bytes], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while recorded(run_dir) < n:
        assert sweep.poll() is None, f"the sweep ended with {recorded(run_dir)} trials before {n} were recorded"
        assert time.monotonic() < end, f"{n} trials not recorded within {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.parametrize("back", ["during_sweep", "after_sweep"])
def test_outage_loses_and_duplicates_nothing(server: Server, tmp_path: Path, back: str) -> None:
    run_dir = tmp_path / "run"
    log = open(tmp_path / "hwnas.log", "w")
    sweep = subprocess.Popen(
        [sys.executable, "-c", "from hwnas.search.cli import run; run()",
         *SWEEP, f"evaluator.epochs={EPOCHS[back]}", f"run_dir={run_dir}", f"tracking.uri={server.uri}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_recorded(run_dir, 1, sweep)
        server.stop()
        if back == "during_sweep":
            wait_recorded(run_dir, 2, sweep)  # a trial starts and ends while the server is away
            server.start()
            assert sweep.poll() is None, "the sweep ended before the server was back: make its trials longer"
        rc = sweep.wait(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        log.close()
    output = (tmp_path / "hwnas.log").read_text()
    assert rc == 0, output[-3000:]
    pending = run_dir / PENDING_FILE
    if back == "after_sweep":
        assert pending.is_file() and "hwnas-sync" in output  # the sweep ended well and said what to do
        server.start()
        sync = subprocess.run(
            [sys.executable, "-c", "import sys; from hwnas.search.cli import sync_main; sys.exit(sync_main())", f"run_dir={run_dir}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert sync.returncode == 0, sync.stdout + sync.stderr
    assert not pending.exists()

    trials = pd.read_csv(run_dir / "trials.csv").set_index("number")
    assert len(trials) == N_TRIALS
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    exp = client.get_experiment_by_name("hwnas-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("hwnas.role") != "export"]
    exports = [r for r in runs if r.data.tags.get("hwnas.role") == "export"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = sorted(int(c.data.tags["trial"]) for c in children)
    assert numbers == sorted(trials.index), numbers  # exactly one child run per trial: none lost, none twice
    for c in children:
        row = trials.loc[int(c.data.tags["trial"])]
        assert c.info.status == ("FINISHED" if row["status"] == "COMPLETE" else "FAILED")
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        if row["status"] == "COMPLETE":
            for metric in ("val_accuracy", "latency_ms", "model_bytes", "time/total_s"):  # MLflow and trials.csv agree
                assert c.data.metrics[metric] == pytest.approx(row[metric]), (c.data.tags["trial"], metric)
            assert any(a.path.endswith(".onnx") for a in client.list_artifacts(c.info.run_id))
            assert len(client.get_metric_history(c.info.run_id, "val_accuracy")) == 1  # logged once
    assert parents[0].data.metrics["n_trials"] == N_TRIALS  # the sweep's outputs reached the parent
    assert any(a.path == "report.html" for a in client.list_artifacts(parents[0].info.run_id))
    # The export: one run of its own under the sweep, registered once (its replay after the outage added nothing).
    assert len(exports) == 1 and exports[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert any(a.path == "export" for a in client.list_artifacts(exports[0].info.run_id))
    assert len(client.search_model_versions("name = 'hwnas-smoke'")) == 1  # the chosen model, registered once
