"""Start hwnas-agent in a subprocess on a free loopback port and wait until it serves (tests, benchmarks).

The agent is asked for `--port 0` and reports the port it bound on its first stdout line, so no port
is picked here and raced for.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass
class AgentProcess:
    proc: subprocess.Popen[str]
    log: Path | None
    url: str = ""

    def wait_ready(self, timeout: float = 60.0) -> AgentProcess:
        """Block until the serving line; RuntimeError with the agent's stderr if it exits or stalls."""
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = self.proc.stdout.readline()
                if line.startswith("hwnas-agent: serving on "):
                    self.url = line.split()[3]
                    return self
                if not line:  # EOF: it exited
                    break
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"hwnas-agent did not start (exit {self.proc.returncode}): {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log is not None and self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)


def start_agent(token_file: str | Path, *args: str, log: str | Path | None = None, wait: bool = True,
                env: dict[str, str] | None = None) -> AgentProcess:
    """`python -m hwnas.agent.cli --port 0 --token-file F *args`; stderr (one line per request) to `log`.
    wait=False: return at once (start several, then wait_ready() each)."""
    err: IO[Any] | int = open(log, "a") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hwnas.agent.cli", "--port", "0", "--token-file", str(token_file), *args],
            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})},
        )
    finally:
        if not isinstance(err, int):
            err.close()
    agent = AgentProcess(proc, Path(log) if log is not None else None)
    return agent.wait_ready() if wait else agent
