"""The agent's HTTP API (aiohttp): /health, /info, /measure.

One measurement at a time: the device is exclusive while it times a file, so an asyncio.Lock admits
one request into the timing thread and a bounded number wait for it; beyond that the answer is 503
busy with Retry-After. The timing runs in a one-thread executor so /health and /info keep answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort
from aiohttp import web

from hwnas.agent.model_check import ModelRejected, check_model
from hwnas.evaluators.measure.fingerprint import device_fingerprint, fingerprint_id
from hwnas.evaluators.measure.protocol import MeasureProtocol, make_session, time_session

VERSION = "1"  # the agent API version, reported by /info; bump when a field changes meaning
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# ONNX Runtime's own exceptions: raised for the file (a graph it cannot load or run), so a 400 that the
# remote target does not retry; anything else during a measurement is the agent's fault (500).
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, n)
    for n in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidGraph", "NotImplemented",
              "InvalidProtobuf", "ModelLoaded", "RuntimeException", "EPFail")
    if hasattr(ort.capi.onnxruntime_pybind11_state, n)
)


@dataclass
class Settings:
    token: str
    provider: str = "cpu"
    threads: int = 1
    max_bytes: int = 64 << 20
    queue: int = 8

    def public(self) -> dict[str, Any]:
        return {"provider": self.provider, "threads": self.threads, "max_bytes": self.max_bytes,
                "queue": self.queue, "version": VERSION}


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:500] if text else type(e).__name__


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@dataclass
class Agent:
    settings: Settings
    fingerprint: dict[str, Any]
    device_id: str
    meter: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0  # requests admitted to /measure: the one timing + those waiting for the lock
    last_s: float = 1.0  # how long the last measurement took: the basis of Retry-After
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "hwnas-measure"))

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def queued(self) -> int:
        return self.pending - (1 if self.busy else 0)

    def authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest on bytes: constant time in the token's content (str needs ASCII only).
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.settings.token.encode()
        )

    # ---- the timing, in the executor thread ----

    def measure_bytes(self, data: bytes, query: dict[str, str]) -> dict[str, Any]:
        protocol = self.protocol_from(query)
        check_model(data, max_bytes=self.settings.max_bytes, batch_size=protocol.batch_size)
        try:
            session = make_session(data, self.settings.provider, protocol)
        except ORT_ERRORS as e:
            raise ModelRejected(f"onnxruntime cannot load the model: {one_line(e)}") from None
        try:
            m = time_session(session, protocol, fingerprint=self.fingerprint, energy=self.meter)
        except ORT_ERRORS as e:
            raise ModelRejected(f"onnxruntime failed running the model: {one_line(e)}") from None
        return {"measurement": m.to_dict(), "sha256": hashlib.sha256(data).hexdigest()}

    def protocol_from(self, query: dict[str, str]) -> MeasureProtocol:
        given = dict(query)
        threads = given.pop("threads", None)
        if threads is not None and threads != str(self.settings.threads):
            raise ValueError(
                f"threads: {threads!r} is not this agent's; allowed: {self.settings.threads} (the agent's --threads)"
            )
        given["threads"] = str(self.settings.threads)
        return MeasureProtocol.from_dict(given)

    # ---- handlers ----

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def info(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return unauthorized()
        return web.json_response({
            "fingerprint": self.fingerprint, "device_id": self.device_id, "settings": self.settings.public(),
            "busy": self.busy, "queued": self.queued,
        })

    async def measure(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return unauthorized()  # before reading the body: an unauthenticated upload costs nothing
        length = request.content_length
        if length is not None and length > self.settings.max_bytes:
            return too_large(length, self.settings.max_bytes)
        if self.pending >= 1 + self.settings.queue:
            retry = max(1, math.ceil(self.last_s * self.pending))
            return json_error(
                503, f"busy: {self.queued} measurements queued (limit {self.settings.queue})",
                headers={"Retry-After": str(retry)},
            )
        self.pending += 1
        try:
            try:
                data = await request.read()  # client_max_size stops a body without Content-Length too
            except web.HTTPRequestEntityTooLarge:
                return too_large(None, self.settings.max_bytes)
            async with self.lock:
                start = time.monotonic()
                try:
                    loop = asyncio.get_running_loop()
                    answer = await loop.run_in_executor(self.executor, self.measure_bytes, data, dict(request.query))
                except (ModelRejected, ValueError) as e:
                    return json_error(400, str(e) if isinstance(e, ModelRejected) else one_line(e))
                except Exception as e:  # the agent keeps serving whatever the file did
                    return json_error(500, f"measurement failed: {one_line(e)}")
                finally:
                    self.last_s = max(0.1, time.monotonic() - start)
            m = answer["measurement"]
            request["log"] = f"sha256={answer['sha256'][:12]} median_ms={m.get('median_ms', float('nan')):.4f}"
            return web.json_response(answer)
        finally:
            self.pending -= 1


def unauthorized() -> web.Response:
    return json_error(401, "missing or wrong token; send Authorization: Bearer <token>",
                      headers={"WWW-Authenticate": "Bearer"})


def too_large(length: int | None, limit: int) -> web.Response:
    size = f"{length} bytes" if length is not None else "larger than that"
    return json_error(413, f"the model is {size}; allowed: at most {limit} bytes (the agent's --max-bytes)")


@web.middleware
async def log_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """One line per request on stderr (never the Authorization header)."""
    start = time.monotonic()
    status: int | str = "?"
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        if e.status >= 400:  # aiohttp's own errors (404, 405, 413 from the parser): JSON like ours
            return json_error(e.status, e.reason)
        raise
    except Exception as e:  # a bug in a handler: one line to the client, the agent keeps serving
        status = 500
        return json_error(500, f"internal error: {one_line(e)}")
    finally:
        extra = request.get("log", "")
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {request.remote} {request.method} {request.path} {status} "
              f"{(time.monotonic() - start) * 1e3:.0f}ms {extra}".rstrip(), file=sys.stderr, flush=True)


def make_agent(settings: Settings) -> Agent:
    from hwnas.evaluators.measure.energy import open_meter

    fp = device_fingerprint(settings.provider)
    return Agent(settings=settings, fingerprint=fp, device_id=fingerprint_id(fp), meter=open_meter(settings.provider))


def make_app(agent: Agent) -> web.Application:
    # client_max_size: aiohttp stops reading the body at the limit, so a huge upload is never held.
    app = web.Application(client_max_size=agent.settings.max_bytes, middlewares=[log_requests])
    app.router.add_get("/health", agent.health)
    app.router.add_get("/info", agent.info)
    app.router.add_post("/measure", agent.measure)

    async def close_executor(_: web.Application) -> None:
        agent.executor.shutdown(wait=True)  # a measurement in flight finishes before exit (SIGTERM)

    app.on_cleanup.append(close_executor)
    return app
