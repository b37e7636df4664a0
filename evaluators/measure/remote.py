"""A pool of identical devices, each running hwnas-agent, as a latency target (conf/hardware/remote.yaml).

Every agent is checked before a sweep (reachable, token accepted, provider, threads, and one device
fingerprint for the whole pool). A measurement goes to one agent of the pool, chosen from the file's
hash so that concurrent trials spread out; an agent that fails (connection, 5xx, busy) is retried with
exponential back-off, on the next agent of the pool where there is one. A model the agent refuses (4xx)
fails at once. An answer from a device other than the pool's is an error: a latency is never silently
taken from another device.

Picklable (Ray ships it to workers): the HTTP session is opened lazily and left out of the pickle, and
so is the token, which is read from the environment variable where the measurement runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hwnas.evaluators.measure.base import AGENT_URL_RE, ENV_NAME_RE, MeasureError
from hwnas.evaluators.measure.fingerprint import ID_FIELDS, fingerprint_id
from hwnas.evaluators.measure.protocol import (
    PROVIDERS,
    Measurement,
    MeasureProtocol,
    check_counts,
    check_provider,
    target_protocol,
)

CONNECT_TIMEOUT_S = 10.0  # a host that does not answer a TCP connect within this is down
INFO_TIMEOUT_S = 30.0  # /health and /info answer at once even while the agent measures
DOWN_S = 60.0  # an agent that just failed is tried last for this long (per process)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def _net_error(e: BaseException) -> str:
    """A requests failure in a few words: urllib3 nests the OS error three exceptions deep."""
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", str(e))
    if errno:
        return f"{type(e).__name__}: {errno.group(0).strip()}"
    return _one_line(e)


def _error_text(response: Any) -> str:
    """The agent's {"error": ...} line, or the start of whatever else came back."""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return body["error"]
    except ValueError:
        pass
    return " ".join(response.text.split())[:200] or response.reason or "no body"


class RemoteTarget:
    """A latency target reached over HTTP: every measurement runs on one agent of `urls`."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        token_env: str = "HWNAS_AGENT_TOKEN",
        provider: str = "cpu",
        threads: int = 1,
        batch_size: int = 1,
        warmup: int = 10,
        repeats: int = 30,
        block_ms: float = 2.0,
        cv_threshold: float = 0.05,
        max_rounds: int = 3,
        timeout_s: float = 120,
        retries: int = 4,
        backoff_s: float = 1.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} is empty; allowed: a non-empty string")
        if isinstance(urls, (str, bytes)) or not isinstance(urls, Sequence) or len(urls) == 0:
            raise ValueError(f"urls={urls!r} is invalid; allowed: a non-empty list of http(s)://HOST:PORT")
        for url in urls:
            if not isinstance(url, str) or not AGENT_URL_RE.fullmatch(url):
                raise ValueError(f"urls: {url!r} is invalid; allowed: http(s)://HOST:PORT (e.g. http://pi-1:8765)")
        self.urls = [u.rstrip("/") for u in urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"urls: {list(urls)} lists an agent twice; allowed: each URL once")
        if not isinstance(token_env, str) or not ENV_NAME_RE.fullmatch(token_env):
            raise ValueError(f"token_env={token_env!r} is invalid; allowed: an environment variable name")
        check_provider(provider)
        check_counts((("threads", threads, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0),
                      ("repeats", repeats, 3), ("max_rounds", max_rounds, 1), ("retries", retries, 0)))
        for name_, number, low_open in (("block_ms", block_ms, True), ("cv_threshold", cv_threshold, True),
                                        ("timeout_s", timeout_s, True), ("backoff_s", backoff_s, False)):
            if not isinstance(number, (int, float)) or isinstance(number, bool) or number != number or (
                number <= 0 if low_open else number < 0
            ):
                raise ValueError(f"{name_}={number!r} is invalid; allowed: a number {'>' if low_open else '>='} 0")
        self.name, self.token_env, self.provider = name, token_env, provider
        self.threads, self.batch_size, self.warmup, self.repeats = threads, batch_size, warmup, repeats
        self.block_ms, self.cv_threshold, self.max_rounds = float(block_ms), float(cv_threshold), max_rounds
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), retries, float(backoff_s)
        self.protocol()  # the protocol's own bounds, named by its keys
        self._fingerprint: dict[str, Any] = {}  # the pool's, from check_available (pickled along: plain data)
        self._device_id = ""
        self._down: dict[str, float] = {}  # url -> monotonic time of its last failure, in this process
        self._session: Any = None

    def __repr__(self) -> str:
        return f"RemoteTarget(name={self.name!r}, urls={self.urls!r}, provider={self.provider!r}, threads={self.threads})"

    # ---- pickling: no open session, no token ----
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None
        state["_down"] = {}  # monotonic times mean nothing in another process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ---- Target ----
    def protocol(self) -> MeasureProtocol:
        return target_protocol(
            batch_size=self.batch_size, threads=self.threads, warmup=self.warmup, repeats=self.repeats,
            block_ms=self.block_ms, cv_threshold=self.cv_threshold, max_rounds=self.max_rounds,
        )

    def token(self) -> str:
        token = os.environ.get(self.token_env, "").strip()
        if not token:
            raise RuntimeError(
                f"hardware.token_env: ${self.token_env} is not set or empty in this process; "
                "allowed: the agents' token in that variable"
            )
        return token

    def _http(self) -> Any:
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def agent_info(self, url: str) -> dict[str, Any]:
        """/health then /info of one agent; RuntimeError (one line) naming the agent and what is wrong."""
        import requests

        http = self._http()
        try:
            health = http.get(f"{url}/health", timeout=(CONNECT_TIMEOUT_S, INFO_TIMEOUT_S))
        except requests.RequestException as e:
            raise RuntimeError(f"hardware.urls: agent {url} is not reachable ({_net_error(e)})") from None
        if health.status_code != 200:
            raise RuntimeError(f"hardware.urls: agent {url} /health answered {health.status_code} ({_error_text(health)})")
        try:
            info = http.get(f"{url}/info", headers=self._headers(), timeout=(CONNECT_TIMEOUT_S, INFO_TIMEOUT_S))
        except requests.RequestException as e:
            raise RuntimeError(f"hardware.urls: agent {url} is not reachable ({_net_error(e)})") from None
        if info.status_code == 401:
            raise RuntimeError(f"hardware.token_env: agent {url} refused the token from ${self.token_env}")
        if info.status_code != 200:
            raise RuntimeError(f"hardware.urls: agent {url} /info answered {info.status_code} ({_error_text(info)})")
        try:
            body = info.json()
            fp, device_id, settings = body["fingerprint"], body["device_id"], body["settings"]
            if not isinstance(fp, dict) or not isinstance(settings, dict) or not isinstance(device_id, str):
                raise TypeError("fields of the wrong type")
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"hardware.urls: {url} is not an hwnas agent (/info: {_one_line(e)})") from None
        return body

    def check_available(self) -> None:
        """Every agent answers, accepts the token, runs the provider with our threads, and all are one device."""
        self.token()
        pool: list[tuple[str, dict[str, Any]]] = []
        for url in self.urls:
            info = self.agent_info(url)
            settings, fp = info["settings"], info["fingerprint"]
            if settings.get("provider") != self.provider:
                raise RuntimeError(
                    f"hardware.provider: agent {url} measures with {settings.get('provider')!r}, not {self.provider!r}; "
                    f"start it with --provider {self.provider}"
                )
            if self.provider in PROVIDERS and PROVIDERS[self.provider] not in (fp.get("providers") or []):
                raise RuntimeError(f"hardware.provider: agent {url} lacks {PROVIDERS[self.provider]}")
            if settings.get("threads") != self.threads:
                raise RuntimeError(
                    f"hardware.threads: agent {url} runs {settings.get('threads')} threads, the target asks for "
                    f"{self.threads}; start it with --threads {self.threads} or set hardware.threads"
                )
            try:
                own_id = fingerprint_id(fp)
            except ValueError as e:
                raise RuntimeError(f"hardware.urls: agent {url} sent a fingerprint that is not one ({e})") from None
            if own_id != info["device_id"]:
                raise RuntimeError(f"hardware.urls: agent {url} reports device_id {info['device_id']} for a fingerprint whose id is {own_id}")
            pool.append((url, fp))
        first_url, first = pool[0]
        for url, fp in pool[1:]:
            if fingerprint_id(fp) != fingerprint_id(first):
                diff = "; ".join(f"{k}: {first.get(k)!r} vs {fp.get(k)!r}" for k in ID_FIELDS if first.get(k) != fp.get(k))
                raise RuntimeError(
                    f"hardware.urls: agents {first_url} and {url} are different devices ({diff}); "
                    "allowed: a pool of identical devices"
                )
        self._fingerprint = dict(first)
        self._device_id = fingerprint_id(first)

    def fingerprint(self) -> dict[str, Any]:
        if not self._fingerprint:
            self.check_available()
        return dict(self._fingerprint)

    @property
    def device_id(self) -> str:
        if not self._device_id:
            self.check_available()
        return self._device_id

    def order(self, sha256: str) -> list[str]:
        """The agents to try for a file: from a hash of it (concurrent trials spread over the pool), the
        ones that failed lately in this process last."""
        start = int(sha256[:8], 16) % len(self.urls)
        rotated = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        return sorted(rotated, key=lambda u: now - self._down.get(u, -1e18) < DOWN_S)

    def measure(self, onnx_path: str | Path) -> Measurement:
        import requests

        path = Path(onnx_path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise MeasureError(f"{path.name}: cannot be read ({e.strerror or e})") from None
        try:
            headers = {**self._headers(), "Content-Type": "application/octet-stream"}
            device_id = self.device_id
        except RuntimeError as e:
            raise MeasureError(f"{path.name} on {self.name!r}: {e}") from None
        sha = hashlib.sha256(data).hexdigest()
        protocol = self.protocol()
        order = self.order(sha)
        http = self._http()
        delay = self.backoff_s
        last = "no attempt"
        retry_after = 0.0  # the largest Retry-After of the agents tried since the last sleep
        for attempt in range(self.retries + 1):
            url = order[attempt % len(order)]
            if attempt > 0 and attempt % len(order) == 0:  # every agent tried once more: back off
                time.sleep(min(max(delay, retry_after), self.timeout_s))
                delay, retry_after = delay * 2, 0.0
            try:
                response = http.post(f"{url}/measure", params=protocol.query(), data=data, headers=headers,
                                     timeout=(CONNECT_TIMEOUT_S, self.timeout_s))
            except requests.RequestException as e:
                last = f"{url}: {_net_error(e)}"
                self._down[url] = time.monotonic()
                continue
            status = response.status_code
            if status == 200:
                return self._accept(path, url, response, sha, protocol, device_id)
            if status == 401:
                raise MeasureError(f"{path.name}: agent {url} refused the token from ${self.token_env}")
            if status == 503 or status >= 500:
                last = f"{url}: {status} {_error_text(response)}"
                self._down[url] = time.monotonic() if status != 503 else self._down.get(url, -1e18)
                try:
                    retry_after = max(retry_after, float(response.headers.get("Retry-After", 0)))
                except ValueError:
                    pass
                continue
            # 400 (the model or the protocol), 413 (too large), other 4xx: the same on every agent.
            raise MeasureError(f"{path.name}: agent {url} refused it ({status}: {_error_text(response)})")
        raise MeasureError(
            f"{path.name}: no agent of {self.name!r} measured it after {self.retries + 1} attempts "
            f"({', '.join(self.urls)}); last error: {last}"
        )

    def _accept(self, path: Path, url: str, response: Any, sha: str, protocol: MeasureProtocol,
                device_id: str) -> Measurement:
        try:
            body = response.json()
            m = Measurement.from_dict(body["measurement"])
        except (ValueError, KeyError, TypeError) as e:
            raise MeasureError(f"{path.name}: agent {url} sent an answer that is not a measurement ({_one_line(e)})") from None
        if body.get("sha256") != sha:
            raise MeasureError(f"{path.name}: agent {url} measured other bytes (sha256 {body.get('sha256')!r}, sent {sha})")
        if m.device_id != device_id or fingerprint_id(m.fingerprint) != device_id:
            raise MeasureError(
                f"{path.name}: agent {url} answered from device {m.device_id}, not the pool's {device_id}; "
                "a latency is never silently taken from another device"
            )
        if m.protocol != protocol.to_dict():
            raise MeasureError(f"{path.name}: agent {url} used another protocol ({m.protocol}) than asked ({protocol.to_dict()})")
        return m
