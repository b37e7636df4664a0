"""Does what the config points at answer? Asked after every value check and before anything is
started or written: the tracking server (`tracking.uri`) and the Ray cluster (`runner.address`).

Each question is bounded by its own key (`tracking.connect_timeout_s`, `runner.connect_timeout_s`,
15 s by default): a closed port is refused at once, an address where something accepts and never
answers within that time, and the error names the key. Nothing here creates a file, a database or
a Ray instance.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig

from hwnas.search.checks import DB_PORTS, ValueProblem, parse_address

DEFAULT_TIMEOUT_S = 15.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _tcp(key: str, value: str, host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.1)):
            pass
    except TimeoutError:
        raise ValueProblem(f"{key}: {value!r} does not answer within {timeout:g} s; allowed: a reachable address "
                           f"(the wait is {key.rsplit('.', 1)[0]}.connect_timeout_s)") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueProblem(f"{key}: {value!r} cannot be reached ({reason}); allowed: a reachable address") from None


def check_tracking(cfg: DictConfig) -> None:
    """An MLflow server answers `GET /health` (or the experiments API) within tracking.connect_timeout_s."""
    if not cfg.tracking.enabled:
        return
    uri = str(cfg.tracking.uri)
    timeout = float(cfg.tracking.get("connect_timeout_s", DEFAULT_TIMEOUT_S))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower().split("+", 1)[0]
    if scheme in DB_PORTS:
        _tcp("tracking.uri", uri, parts.hostname or "", parts.port or DB_PORTS[scheme], timeout)
        return
    if scheme not in ("http", "https"):
        return  # sqlite: checked as a file by checks.check_sqlite_file
    _tcp("tracking.uri", uri, parts.hostname or "", parts.port or (443 if scheme == "https" else 80), timeout)
    deadline = time.monotonic() + timeout
    base = uri.rstrip("/")
    last = "no answer"
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, method="GET"), timeout=left) as resp:
                body = resp.read(4096)
                if resp.status == 200 and (path == "/health" or _is_json(body)):
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except TimeoutError:
            last = f"no answer within {timeout:g} s (tracking.connect_timeout_s)"
            break
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            last = str(reason).splitlines()[0] if str(reason) else type(exc).__name__
    raise ValueProblem(f"tracking.uri: {uri!r} is not an MLflow server that answers ({last}); "
                       "allowed: a reachable MLflow tracking server, or sqlite:///PATH")


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body or b"null")
    except ValueError:
        return False
    return True


def resolve_address(address: Any) -> str | None:
    """runner.address as host:port (or ray://host:port); None for a new local Ray."""
    if address is None:
        return None
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            found = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # noqa: BLE001 - Ray says why in many ways; one line is enough
            raise ValueProblem(f"runner.address: 'auto' finds no running Ray cluster ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                               "allowed: auto with a cluster started by `ray start` or RAY_ADDRESS, HOST:PORT, ray://HOST:PORT, or null") from None
        if found is None:
            raise ValueProblem("runner.address: 'auto' finds no running Ray cluster; allowed: HOST:PORT, ray://HOST:PORT, or null")
        return str(found)
    return str(address)


def check_ray_address(address: Any, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """A Ray GCS (HOST:PORT) or Ray Client server (ray://HOST:PORT) completes a gRPC handshake in time.

    A TCP connect alone is not enough: a port where something accepts and never answers would
    then hang `ray.init` for minutes. gRPC's channel-ready wait needs the HTTP/2 handshake."""
    resolved = resolve_address(address)
    if resolved is None:
        return
    parsed = parse_address("runner.address", resolved)
    assert parsed is not None
    _, host, port = parsed
    _tcp("runner.address", str(address), host, port, timeout)
    silent = ValueProblem(f"runner.address: {str(address)!r} accepts connections but no Ray answers within {timeout:g} s "
                          "(runner.connect_timeout_s); allowed: the address of a running Ray head (ray start --head)")
    # Ray's GCS and Ray Client servers speak gRPC: HTTP/2, whose server sends a SETTINGS frame as soon
    # as it reads the client preface. Something that never answers it is not Ray.
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 0.1)) as conn:
            conn.sendall(HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            frame = conn.recv(9)
    except TimeoutError:
        raise silent from None
    except OSError as exc:
        raise ValueProblem(f"runner.address: {str(address)!r} cannot be reached ({exc.strerror or type(exc).__name__}); "
                           "allowed: the address of a running Ray head") from None
    if len(frame) < 4 or frame[3] != 0x04:
        raise ValueProblem(f"runner.address: {str(address)!r} answers, but not as Ray does (no gRPC/HTTP2); "
                           "allowed: the address of a running Ray head (ray start --head)")


def check_reachable(cfg: DictConfig) -> None:
    """Everything the config points at over the network answers, or one ValueProblem naming the key."""
    check_tracking(cfg)
    runner = cfg.runner
    if "address" in runner:
        check_ray_address(runner.address, float(runner.get("connect_timeout_s", DEFAULT_TIMEOUT_S)))
