"""Trial time limits and error texts, shared by both runners and light enough for Ray workers to import."""

from __future__ import annotations

import time
import traceback


def check_timeout(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"runner.trial_timeout_s: {value!r} is not allowed; allowed: a number of seconds > 0, or null")
    return None if value is None else float(value)


def deadline_after(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def error_text(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()
