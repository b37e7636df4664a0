"""RemoteTarget against real hwnas-agent processes on loopback: the pool check, measurements spread over
the pool, back-off on a busy agent, an agent SIGKILLed mid-measurement, and devices that differ."""

from __future__ import annotations

import json
import pickle
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from torch import nn

from hwnas.agent.launch import AgentProcess, start_agent
from hwnas.evaluators.measure.base import MeasureError, Target
from hwnas.evaluators.measure.fingerprint import fingerprint_id
from hwnas.evaluators.measure.remote import RemoteTarget
from hwnas.evaluators.onnx_export import export_onnx

TOKEN = "remote-test-token"
ENV = "HWNAS_TEST_AGENT_TOKEN"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("remote")
    (d / "token").write_text(TOKEN)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    valid = export_onnx(model, torch.zeros(1, 3, 16, 16), d / "valid.onnx", opset=17)
    (d / "bad.onnx").write_bytes(b"not an onnx file at all")
    return {"dir": d, "token": d / "token", "valid": valid, "bad": d / "bad.onnx"}


@pytest.fixture(scope="module")
def agents(files) -> dict[str, AgentProcess]:
    """Started together (each takes ~1 s to import ONNX Runtime), stopped together."""
    specs = {"a": ["--queue", "0"], "b": [], "victim": [], "threads2": ["--threads", "2"]}
    started = {k: start_agent(files["token"], *args, log=files["dir"] / f"{k}.log", wait=False) for k, args in specs.items()}
    try:
        for a in started.values():
            a.wait_ready()
        yield started
    finally:
        for a in started.values():
            a.stop(signal.SIGKILL)


@pytest.fixture(autouse=True)
def token_env(monkeypatch):
    monkeypatch.setenv(ENV, TOKEN)


def target(urls: list[str], **kw: Any) -> RemoteTarget:
    kw = {"token_env": ENV, "repeats": 10, "retries": 2, "backoff_s": 0.05, **kw}
    return RemoteTarget("remote-test", urls, **kw)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"urls": []}, "urls"),
    ({"urls": "http://a:1"}, "urls"),
    ({"urls": ["ftp://a:1"]}, "http(s)://HOST:PORT"),
    ({"urls": ["http://a"]}, "http(s)://HOST:PORT"),
    ({"urls": ["http://a:1", "http://a:1/"]}, "twice"),
    ({"token_env": "1BAD"}, "token_env"),
    ({"provider": "gpu"}, "ambiguous"),
    ({"threads": 0}, "threads"),
    ({"repeats": 2}, "repeats"),
    ({"retries": -1}, "retries"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"backoff_s": -1.0}, "backoff_s"),
    ({"block_ms": 1e9}, "block_s"),
])
def test_bad_fields_are_one_line_value_errors(kwargs, words):
    with pytest.raises(ValueError) as e:
        RemoteTarget("r", **{"urls": ["http://127.0.0.1:1"], **kwargs})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_check_available_on_two_agents_then_measure_and_pickle(agents, files):
    t = target([agents["a"].url, agents["b"].url])
    assert isinstance(t, Target)
    t.check_available()
    info = requests.get(f"{agents['a'].url}/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert t.device_id == info["device_id"] == fingerprint_id(t.fingerprint())
    m = t.measure(files["valid"])
    assert m.median_ms > 0 and m.device_id == t.device_id and m.protocol == t.protocol().to_dict()
    clone = pickle.loads(pickle.dumps(t))  # what Ray does; the session is reopened, the token re-read
    assert clone._session is None and TOKEN.encode() not in pickle.dumps(t)
    assert clone.measure(files["valid"]).device_id == t.device_id


def test_token_problems_are_named(agents, monkeypatch):
    monkeypatch.delenv(ENV)
    with pytest.raises(RuntimeError, match=f"\\${ENV} is not set"):
        target([agents["b"].url]).check_available()
    monkeypatch.setenv(ENV, "wrong")
    with pytest.raises(RuntimeError) as e:
        target([agents["b"].url]).check_available()
    assert str(e.value) == f"hardware.token_env: agent {agents['b'].url} refused the token from ${ENV}"


def test_an_unreachable_agent_fails_the_check(agents, files):
    dead = start_agent(files["token"])
    url = dead.url
    dead.stop()
    with pytest.raises(RuntimeError, match=f"agent {url} is not reachable"):
        target([agents["b"].url, url]).check_available()


def test_agents_with_other_threads_are_refused(agents):
    with pytest.raises(RuntimeError, match="runs 2 threads, the target asks for 1"):
        target([agents["b"].url, agents["threads2"].url]).check_available()


class FakeAgent:
    """An HTTP server that answers like the real agent `real`, but reports another CPU model: a
    different device. Its /measure forwards to the real agent and rewrites the answer's fingerprint."""

    def __init__(self, real: str) -> None:
        self.real = real
        headers = {"Authorization": f"Bearer {TOKEN}"}
        info = requests.get(f"{real}/info", headers=headers, timeout=10).json()
        self.info_body = self.other_device(info)
        self.same_info = info  # mode "liar": /info like the pool, measurements from another device
        self.mode = "other"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self.reply({"status": "ok"})
                else:
                    self.reply(fake.info_body if fake.mode == "other" else fake.same_info)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                r = requests.post(f"{fake.real}/measure?{self.path.partition('?')[2]}", data=body, headers=headers,
                                  timeout=60).json()
                m = r["measurement"]
                m["fingerprint"] = fake.info_body["fingerprint"]
                m["device_id"] = fake.info_body["device_id"]
                self.reply(r)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def other_device(info: dict) -> dict:
        fp = {**info["fingerprint"], "cpu_model": "Some Other CPU @ 1.0GHz"}
        return {**info, "fingerprint": fp, "device_id": fingerprint_id(fp)}


def test_a_pool_of_different_devices_is_refused_and_answers_from_another_device_fail(agents, files):
    fake = FakeAgent(agents["b"].url)
    try:
        with pytest.raises(RuntimeError) as e:
            target([agents["b"].url, fake.url]).check_available()
        assert "are different devices (cpu_model:" in str(e.value) and "Some Other CPU" in str(e.value)
        fake.mode = "liar"
        t = target([fake.url])
        t.check_available()  # its /info claims the pool's device ...
        with pytest.raises(MeasureError, match="never silently taken from another device"):
            t.measure(files["valid"])  # ... but the measurement says otherwise
    finally:
        fake.server.shutdown()


def test_a_bad_model_fails_at_once_without_retries(agents, files):
    t = target([agents["b"].url], retries=4, backoff_s=5.0)
    start = time.monotonic()
    with pytest.raises(MeasureError, match=r"bad.onnx: agent .* refused it \(400: not an ONNX file"):
        t.measure(files["bad"])
    assert time.monotonic() - start < 4  # no back-off sleep


def test_a_busy_agent_is_retried_after_retry_after(agents, files):
    """Agent a has --queue 0: while it times a slow request, the target's 503 is retried after Retry-After."""
    a = agents["a"].url
    slow: dict = {}
    t_slow = threading.Thread(target=lambda: slow.update(r=requests.post(
        f"{a}/measure", params={"blocks": "60", "block_s": "0.01"}, data=files["valid"].read_bytes(),
        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)))
    t_slow.start()
    try:
        wait_busy(a)
        t = target([a], retries=3, backoff_s=0.1)
        m = t.measure(files["valid"])
        assert m.median_ms > 0
        assert "POST /measure 503" in agents["a"].log_text()
    finally:
        t_slow.join(60)
    assert slow["r"].status_code == 200


def wait_busy(url: str) -> None:
    deadline = time.monotonic() + 20
    while not requests.get(f"{url}/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()["busy"]:
        assert time.monotonic() < deadline, f"{url} never got busy"
        time.sleep(0.02)


def test_an_agent_killed_mid_measurement(agents, files):
    """SIGKILL while it measures: retries with back-off, then MeasureError naming the agent and the
    reason; in a pool of two, the surviving agent answers."""
    victim = agents["victim"]
    alone = target([victim.url], repeats=80, block_ms=10.0)
    alone.check_available()
    result: dict = {}

    def run() -> None:
        try:
            result["m"] = alone.measure(files["valid"])
        except MeasureError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=run)
    thread.start()
    wait_busy(victim.url)
    victim.proc.send_signal(signal.SIGKILL)
    thread.join(60)
    assert "m" not in result
    error = result["error"]
    assert f"no agent of 'remote-test' measured it after 3 attempts ({victim.url})" in error
    assert "last error: " + victim.url in error and "Connection" in error and "\n" not in error

    import hashlib

    start = int(hashlib.sha256(files["valid"].read_bytes()).hexdigest()[:8], 16) % 2
    urls = [victim.url, agents["b"].url] if start == 0 else [agents["b"].url, victim.url]
    pool = target(urls)
    assert pool.order(hashlib.sha256(files["valid"].read_bytes()).hexdigest())[0] == victim.url  # tried first
    pool._fingerprint, pool._device_id = alone._fingerprint, alone._device_id  # checked before the kill
    m = pool.measure(files["valid"])
    assert m.device_id == alone.device_id and m.median_ms > 0
