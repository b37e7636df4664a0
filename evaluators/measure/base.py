"""The written interface of the measure folder: what a latency target (conf/hardware/*.yaml) provides.

A target times ONNX files on one device with one protocol, and says which device that was (its
fingerprint) so that a latency is never silently taken from another device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hwnas.evaluators.measure.protocol import Measurement, MeasureProtocol


# An agent's address (http(s)://HOST:PORT, IPv6 in brackets) and the name of the environment variable
# holding its token: checked alike by the config schema (search/checks.py) and RemoteTarget.
AGENT_URL_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):\d{1,5}/?")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

# conf/hardware keys that are not the target's own: how latencies are obtained (plan.py).
PLAN_KEYS = ("cache", "predictor", "prescreen")


def target_config(node: Mapping[str, Any]) -> dict[str, Any]:
    """A conf/hardware node without the plan's keys: what `instantiate` builds the target from."""
    return {str(k): node[k] for k in node.keys() if k not in PLAN_KEYS}


class MeasureError(RuntimeError):
    """A measurement failed; the message is one line naming the file or device and the reason."""


@runtime_checkable
class Target(Protocol):
    name: str
    provider: str  # "cpu" | "cuda"

    def check_available(self) -> None:
        """RuntimeError (one line) before any work if the target cannot measure (remote: contacts every agent)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """The device's fingerprint (see fingerprint.device_fingerprint)."""
        ...

    def protocol(self) -> MeasureProtocol:
        ...

    def measure(self, onnx_path: str | Path) -> Measurement:
        """Time one ONNX file; MeasureError (one line) on failure."""
        ...
