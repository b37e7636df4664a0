"""hwnas-agent: serve /health, /info and /measure for this device.

    hwnas-agent --port 8765 --token-file F [--host 127.0.0.1] [--provider cpu|cuda] [--threads N]
                [--max-bytes B] [--queue N]

Bad arguments (token file missing, empty or unreadable; a provider this onnxruntime lacks; the port
taken) end with one line on stderr and exit status 2 before anything is served. Once listening, one
line on stdout says where (`--port 0` picks a free port and that line names it). SIGTERM/SIGINT stop
accepting requests and let a measurement in flight finish.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    pass


def positive(kind: str, low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; allowed: an integer >= {low}")
        return value

    parse.__name__ = kind
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage block too)
        print(f"hwnas-agent: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="hwnas-agent", description="Measure ONNX files on this device for a remote hwnas sweep.")
    p.add_argument("--port", type=positive("port", 0), required=True, help="TCP port (0: any free port)")
    p.add_argument("--token-file", required=True, help="file holding the bearer token (keep it mode 600)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=positive("threads", 1), default=1, help="intra-op threads of every session")
    p.add_argument("--max-bytes", type=positive("max-bytes", 1), default=64 << 20, help="largest upload (bytes)")
    p.add_argument("--queue", type=positive("queue", 0), default=8, help="measurements that may wait (beyond: 503)")
    return p


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--token-file: {path} cannot be read ({e.__class__.__name__}: {getattr(e, 'strerror', '') or e})") from None
    if not token:
        raise UsageError(f"--token-file: {path} is empty; allowed: a file holding the token")
    if any(c.isspace() for c in token) or not token.isascii() or not token.isprintable():
        raise UsageError(f"--token-file: {path} holds whitespace or non-ASCII characters; allowed: one ASCII token")
    return token


def check_provider(provider: str) -> None:
    import onnxruntime as ort

    from hwnas.agent.server import PROVIDERS

    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise UsageError(
            f"--provider: {provider} needs {PROVIDERS[provider]}, which this onnxruntime lacks "
            f"(available: {', '.join(available)})"
        )


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UsageError(f"--host: {host} cannot be resolved ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart is not blocked by TIME_WAIT
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


async def serve(args: argparse.Namespace, token: str) -> int:
    from aiohttp import web

    from hwnas.agent.server import Settings, make_agent, make_app

    sock = bind(args.host, args.port)  # before anything else: a taken port is a usage error
    agent = make_agent(Settings(token=token, provider=args.provider, threads=args.threads,
                                max_bytes=args.max_bytes, queue=args.queue))
    runner = web.AppRunner(make_app(agent), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, shutdown_timeout=30.0).start()
    port = sock.getsockname()[1]
    print(f"hwnas-agent: serving on http://{args.host}:{port} provider={args.provider} threads={args.threads} "
          f"device_id={agent.device_id}", flush=True)
    if Path(args.token_file).stat().st_mode & 0o077:
        print(f"hwnas-agent: warning: --token-file {args.token_file} is readable by other users (chmod 600 it)",
              file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("hwnas-agent: stopping (a measurement in flight finishes first)", file=sys.stderr, flush=True)
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        token = read_token(args.token_file)
        check_provider(args.provider)
        return asyncio.run(serve(args, token))
    except UsageError as e:
        print(f"hwnas-agent: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
