"""A real two-node Ray cluster on this machine: a sweep joins it and its trials run on both nodes.

Both nodes are `ray start --block` subprocesses of this test, with their own temp dir and ports,
so no other Ray instance on the machine is joined or stopped; teardown kills their process trees.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_jsonl
from test_scheduler_runs import check_rung_records

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
TOKEN = secrets.token_hex(32)
SMOKE = ("experiment=smoke", "n_trials=4", "search=random", "tracking.enabled=false", "runner=ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env() -> dict[str, str]:
    # Ray 2.60 clusters use token authentication (the default once a token exists in ~/.ray). This
    # cluster gets its own token, passed to its nodes and drivers by environment: ~/.ray is left alone.
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}


def hwnas(*overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from hwnas.search.cli import main; sys.exit(main())", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=cluster_env(),
    )


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            text = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if text:
            parents[int(entry.name)] = int(text[text.rfind(")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found.extend(kids)
        frontier.extend(kids)
    return found


def stop_node(node: subprocess.Popen[bytes]) -> None:
    """SIGTERM `ray start --block` (it stops its own processes), then SIGKILL whatever is left."""
    tree = descendants(node.pid)
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=20)
    except subprocess.TimeoutExpired:
        node.kill()
    for pid in [*reversed(tree), *descendants(node.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_args() -> list[str]:
    # Every port Ray would otherwise take at a fixed default gets a free one: other Ray instances
    # (other sweeps, other tests) may be running on this machine.
    return [
        "--block", "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
        "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
    ]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    temp = Path(tempfile.mkdtemp(prefix="hwr", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    address = f"127.0.0.1:{free_port()}"
    env = cluster_env()
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        with open(temp / "head.log", "wb") as log:
            nodes.append(subprocess.Popen(
                [RAY, "start", "--head", "--port", address.split(":")[1], "--temp-dir", str(temp),
                 "--include-dashboard", "false", *node_args()],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))
        with open(temp / "worker.log", "wb") as log:
            nodes.append(subprocess.Popen(
                [RAY, "start", "--address", address, "--temp-dir", str(temp), *node_args()],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))
        wait = (
            "import sys, time, ray\n"
            f"ray.init(address={address!r}, logging_level='ERROR')\n"
            "end = time.monotonic() + 120\n"
            "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.monotonic() < end:\n"
            "    time.sleep(0.5)\n"
            "sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) == 2 else 1)\n"
        )
        waiter = subprocess.Popen([sys.executable, "-c", wait], stderr=subprocess.PIPE, text=True, env=env)
        try:
            while waiter.poll() is None:  # a node that dies fails the test now, not after the timeout
                for node, name in zip(nodes, ("head", "worker"), strict=True):
                    log = (temp / f"{name}.log").read_text(errors="replace")[-2000:]
                    assert node.poll() is None, f"ray {name} node exited {node.returncode}: {log}"
                time.sleep(0.5)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        assert waiter.wait() == 0, waiter.stderr.read()[-2000:] if waiter.stderr else ""
        yield address
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_without_shared_storage_is_refused(cluster: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = hwnas(*SMOKE, f"runner.address={cluster}", f"run_dir={run_dir}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hwnas: error:")]
    assert len(errors) == 1 and "runner.storage" in errors[0] and "2 nodes" in errors[0], proc.stderr[-2000:]
    assert not run_dir.exists()  # refused before anything was written


def test_sweep_runs_trials_on_both_nodes(cluster: str, tmp_path: Path) -> None:
    run_dir, shared = tmp_path / "run", tmp_path / "shared"
    proc = hwnas(
        *SMOKE, f"runner.address={cluster}", f"runner.storage={shared}", "runner.max_concurrent=2", f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "COMPLETE").all(), trials[["number", "status", "error"]]
    assert trials["node"].nunique() == 2, trials["node"].tolist()  # hostname/<node id>: two Ray nodes
    # Trials wrote their models to the shared storage, not to the driver's run_dir.
    for artifact in trials["artifact"]:
        assert Path(artifact).is_relative_to(shared.resolve()) and Path(artifact).is_file(), artifact
    assert (run_dir / "export" / "model.onnx").is_file()
    # The data was decoded once, into the shared storage every node maps, not into the driver's run_dir.
    cache = Path(json.loads((run_dir / "data.json").read_text())["cache"]["path"])
    assert cache.is_relative_to(shared.resolve()) and (cache / "x.npy").is_file(), cache
    assert not (run_dir / "data").exists()


def test_moasha_on_the_cluster_stops_trials_from_the_driver(cluster: str, tmp_path: Path) -> None:
    """MO-ASHA on two nodes: trials run on both, rung decisions are made by the driver (one record per trial
    and rung it reached, in the driver's run_dir), stopped trials leave no file in the shared storage."""
    run_dir, shared = tmp_path / "run", tmp_path / "shared"
    epochs, n = 4, 8
    proc = hwnas(
        "experiment=smoke", f"n_trials={n}", "search=random", "tracking.enabled=false", "runner=ray", "seed=0",
        "scheduler=moasha", "scheduler.rungs=[1,2]", f"evaluator.epochs={epochs}",
        f"runner.address={cluster}", f"runner.storage={shared}", "runner.max_concurrent=2", f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and set(trials["status"]) <= {"COMPLETE", "STOPPED"}, trials[["number", "status", "error"]]
    stopped, complete = trials[trials["status"] == "STOPPED"], trials[trials["status"] == "COMPLETE"]
    assert len(stopped) and len(complete), trials[["number", "status", "epochs"]]
    assert trials["node"].nunique() == 2, trials["node"].tolist()
    assert (complete["epochs"] == epochs).all() and stopped["epochs"].isin([1, 2]).all()
    for artifact in complete["artifact"]:  # finished trials wrote to the shared storage
        assert Path(artifact).is_relative_to(shared.resolve()) and Path(artifact).is_file(), artifact
    assert stopped["artifact"].isna().all()
    folders = {f"{k:04d}" for k in stopped["number"]}  # a stopped trial made no trained file anywhere
    assert not [p for p in shared.rglob("model*.onnx") if p.parent.name in folders and "early" not in p.name]
    # One decision per trial and rung it reached, kept where the driver runs.
    records = read_jsonl(run_dir / "rungs.jsonl")
    check_rung_records(read_jsonl(run_dir / "trials.jsonl"), records, (1, 2), epochs)
    assert len(records) == sum(2 if e >= 2 else 1 for e in trials["epochs"])  # none for a rung not reached
    assert {r["key"] for r in records if not r["keep"]} == set(stopped["arch_id"])
    assert not (shared / "rungs.jsonl").exists()
