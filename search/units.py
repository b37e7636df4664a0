"""How numbers read: one unit for machines, a readable one for people.

Every number a program reads (MLflow metrics, trials.csv, the model card's JSON, budgets) keeps its
unit in its name and is in milliseconds for latency. Text a person reads (the progress line, the
summary, the report's hover labels, the card's Markdown) shows latency in µs below 1 ms and in ms
from there, to three significant digits: 0.0107 ms reads as "10.7 µs".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

TIME_PREFIX = "time/"


def format_ms(ms: float | None) -> str:
    """10.7 µs, 512 µs, 3.21 ms, 1250 ms; '-' when there is no number."""
    if ms is None or not isinstance(ms, (int, float)) or not math.isfinite(ms):
        return "-"
    if abs(ms) < 1.0:
        return f"{ms * 1000:.3g} µs"
    return f"{ms:.3g} ms" if abs(ms) < 1000 else f"{ms:.0f} ms"


def is_step_time(name: str) -> bool:
    """Seconds a step of a trial took (`train_s`, `total_s`, `data_load_s`): not a result of the candidate."""
    return name.endswith("_s") and not name.startswith(TIME_PREFIX)


def display_name(name: str) -> str:
    return f"{TIME_PREFIX}{name}" if is_step_time(name) else name


def display_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's metrics as MLflow and trials.csv name them: step times under `time/<step>_s`."""
    return {display_name(k): v for k, v in metrics.items()}
