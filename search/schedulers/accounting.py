"""What a sweep's scheduler spent and saved, from its trial records: epochs trained, trials stopped per rung,
trials rejected before training. One computation for the progress line, trials.csv and the report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from hwnas.search.trial_log import COMPLETE, REJECTED, STOPPED


def trial_epochs(row: Mapping[str, Any]) -> tuple[float, float] | None:
    """(epochs trained, epochs it would have trained in full) of one record; None when unknown (a failed trial,
    or a record made before epochs were recorded)."""
    metrics = row.get("metrics") or {}
    if row.get("status") == COMPLETE and "train_epochs" in metrics:
        return float(metrics["train_epochs"]), float(metrics["train_epochs"])
    if row.get("status") in (STOPPED, REJECTED) and "train_epochs_full" in metrics:
        return float(row.get("epochs") or 0), float(metrics["train_epochs_full"])
    return None


def schedule_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """epochs (trained), epochs_full (had every counted trial trained in full), saved_share (1 - the ratio),
    stopped ({rung epoch: trials}), rejected (trials), counted (trials whose epochs are known)."""
    pairs = [p for p in (trial_epochs(r) for r in rows) if p is not None]
    spent, full = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    stopped = Counter(int(r.get("epochs") or 0) for r in rows if r.get("status") == STOPPED)
    return {
        "epochs": spent,
        "epochs_full": full,
        "saved_share": (1.0 - spent / full) if full > 0 else 0.0,
        "stopped": dict(sorted(stopped.items())),
        "rejected": sum(r.get("status") == REJECTED for r in rows),
        "counted": len(pairs),
    }


def schedule_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """The progress line's part: "epochs 40 of 120 (67% saved) | stopped 5@1 2@3 | rejected 4"; empty when no
    trial was stopped or rejected."""
    s = schedule_summary(rows)
    if not s["stopped"] and not s["rejected"]:
        return ""
    parts = [f"epochs {s['epochs']:g} of {s['epochs_full']:g} ({100 * s['saved_share']:.0f}% saved)"]
    if s["stopped"]:
        parts.append("stopped " + " ".join(f"{n}@{epoch}" for epoch, n in s["stopped"].items()))
    if s["rejected"]:
        parts.append(f"rejected {s['rejected']}")
    return " | ".join(parts)
