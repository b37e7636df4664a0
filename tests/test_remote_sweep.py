"""Sweeps that measure on devices reached through hwnas-agent: real agent processes on loopback with a
real token, trials on Ray workers POSTing their ONNX files, an agent killed mid-sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, hwnas, hwnas_command, mlflow_runs, output_of, read_jsonl

from hwnas.agent.launch import AgentProcess, start_agent
from hwnas.evaluators.measure.fingerprint import device_fingerprint, fingerprint_id

TOKEN = "sweep-test-token"
ENV = {"HWNAS_AGENT_TOKEN": TOKEN}
FAST = ("experiment=smoke", "space.quant=[fp32,int8]", "hardware=remote", "hardware.repeats=5", "hardware.block_ms=0.5",
        "evaluator.epochs=1", "evaluator.finetune_epochs=0")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agents") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def pool(token_file: Path) -> list[AgentProcess]:
    agents = [start_agent(token_file, log=token_file.parent / f"agent{i}.log", wait=False) for i in range(2)]
    try:
        yield [a.wait_ready() for a in agents]
    finally:
        for a in agents:
            a.stop(signal.SIGKILL)


def urls(agents: list[AgentProcess]) -> str:
    return "hardware.urls=[" + ",".join(a.url for a in agents) + "]"


def test_a_sweep_on_ray_measures_through_a_pool_of_agents(tmp_path: Path, pool: list[AgentProcess]) -> None:
    run_dir, uri = tmp_path / "exp" / "run", f"sqlite:///{tmp_path}/mlflow.db"
    before = [len(a.log_text().splitlines()) for a in pool]
    proc = hwnas(*FAST, urls(pool), "runner=ray", "runner.max_concurrent=2", "n_trials=4", f"run_dir={run_dir}",
                 f"tracking.uri={uri}", env=ENV, timeout=600)
    assert proc.returncode == 0, output_of(proc)
    assert "remote measured on 2 agent(s)" in proc.stdout
    hardware = json.loads((run_dir / "hardware.json").read_text())
    # The agents run on this machine: the device they report is this one.
    assert hardware["kind"] == "RemoteTarget" and hardware["urls"] == [a.url for a in pool]
    assert hardware["device_id"] == fingerprint_id(device_fingerprint("cpu"))
    trials = pd.read_csv(run_dir / "trials.csv")
    assert (trials["status"] == "COMPLETE").all(), trials["error"].tolist()
    assert (trials["latency_runs"] > 0).all() and (trials["device_id"] == hardware["device_id"]).all()
    measured = [sum("POST /measure" in line and " 200" in line for line in a.log_text().splitlines()[n:])
                for a, n in zip(pool, before, strict=True)]
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    # Every trial's file once, and the exported file once more (re-measured at export), each on the agent its
    # sha256 picks (RemoteTarget.order: concurrent trials spread over the pool). Which agent that is follows
    # from the files' bytes, so it is computed here, not assumed: 5 files can all pick one agent (1 in 16).
    shas = [r["artifact_sha256"] for r in read_jsonl(run_dir / "trials.jsonl")] + [card["files"]["sha256"]]
    expected = [sum(int(sha[:8], 16) % len(pool) == i for sha in shas) for i in range(len(pool))]
    assert sum(measured) == 5 and measured == expected, (measured, expected)
    assert card["latency"]["export"]["source"] == "measured" and card["latency"]["device_id"] == hardware["device_id"]
    parents, children = mlflow_runs(uri, "hwnas-smoke")
    assert parents[0].data.tags["latency_target"] == "remote" and parents[0].data.params["device.id"] == hardware["device_id"]
    assert all(c.data.tags["device_id"] == hardware["device_id"] for c in children)


@pytest.mark.parametrize(
    ("env", "needle"),
    [({"HWNAS_AGENT_TOKEN": "wrong"}, "refused the token"), ({"HWNAS_AGENT_TOKEN": ""}, "HWNAS_AGENT_TOKEN")],
)
def test_an_agent_that_refuses_the_token_stops_the_run_before_any_work(
    tmp_path: Path, pool: list[AgentProcess], env: dict[str, str], needle: str
) -> None:
    run_dir = tmp_path / "run"
    proc = hwnas(*FAST, urls(pool), "runner=local", f"run_dir={run_dir}", "tracking.enabled=false", env=env)
    assert proc.returncode == 2, output_of(proc)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("hwnas: error: hardware") and needle in line, line
    assert not run_dir.exists() and not (tmp_path / "latency_cache.sqlite").exists()


def test_an_unreachable_agent_stops_the_run_before_any_work(tmp_path: Path, pool: list[AgentProcess]) -> None:
    run_dir = tmp_path / "run"
    dead = "hardware.urls=[" + pool[0].url + ",http://127.0.0.1:9]"  # port 9 (discard): nothing listens
    proc = hwnas(*FAST, dead, "runner=local", f"run_dir={run_dir}", "tracking.enabled=false", env=ENV)
    assert proc.returncode == 2, output_of(proc)
    assert "127.0.0.1:9" in proc.stderr.strip().splitlines()[-1]
    assert not run_dir.exists()


def test_an_agent_killed_mid_sweep_fails_its_trials_and_keeps_the_finished_ones(tmp_path: Path, token_file: Path) -> None:
    agent = start_agent(token_file, log=tmp_path / "victim.log")
    run_dir = tmp_path / "exp" / "run"
    overrides = (*FAST, f"hardware.urls=[{agent.url}]", "hardware.retries=2", "hardware.backoff_s=0.2",
                 "hardware.timeout_s=10", "runner=local", "n_trials=4", f"run_dir={run_dir}", "tracking.enabled=false")
    sweep = subprocess.Popen(hwnas_command(*overrides), cwd=ROOT, env={**os.environ, **ENV},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(r["status"] == "COMPLETE" for r in read_jsonl(run_dir / "trials.jsonl")):
            assert sweep.poll() is None and time.monotonic() < deadline, "no trial finished"
            time.sleep(0.2)
        agent.stop(signal.SIGKILL)
        out, err = sweep.communicate(timeout=300)
    finally:
        agent.stop(signal.SIGKILL)
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-2000:] + err[-2000:]  # the sweep ends normally
    rows = read_jsonl(run_dir / "trials.jsonl")
    assert len(rows) == 4
    done = [r for r in rows if r["status"] == "COMPLETE"]
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert done and failed, [r["status"] for r in rows]
    for r in failed:  # the reason names the agent; nothing was taken from another device
        assert agent.url.split("//")[1] in r["error"] and "latency_ms" not in r["metrics"], r["error"]
    for r in done:  # what finished before the kill is kept, with its file and its measurement
        assert (run_dir / r["artifact"]).is_file() and r["metrics"]["latency_runs"] > 0
    trials = pd.read_csv(run_dir / "trials.csv")
    assert sorted(trials["status"]) == sorted(r["status"] for r in rows)
    # The export still happens with the device gone: the trial's figure, and the card says why there is no second.
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert agent.url.split("//")[1] in card["latency"]["export"]["error"], card["latency"]
    assert card["metrics"]["latency_source"] == "trial (not re-measured)"
    assert card["metrics"]["latency_ms"] == card["latency"]["trial"]["p50_ms"] and "not re-measured" in out

    # The pool may move (an agent restarted on another port): the run resumes there, on the same device.
    again = start_agent(token_file, log=tmp_path / "again.log")
    try:
        moved = [o if not o.startswith("hardware.urls=") else f"hardware.urls=[{again.url}]" for o in overrides]
        proc = hwnas(*moved, "resume=true", env=ENV)
        assert proc.returncode == 0 and "resuming" in proc.stdout, output_of(proc)
        # A run folder whose latencies came from another device is not continued on this one.
        saved = json.loads((run_dir / "hardware.json").read_text())
        (run_dir / "hardware.json").write_text(json.dumps({**saved, "device_id": "0123456789abcdef"}))
        proc = hwnas(*moved, "resume=true", env=ENV)
        assert proc.returncode == 2, output_of(proc)
        line = proc.stderr.strip().splitlines()[-1]
        assert "device 0123456789abcdef" in line and "allowed: the same device" in line, line
    finally:
        again.stop(signal.SIGKILL)
