"""Every trial trains for its full epochs: no rungs; latency-first rejection is the only thing it may do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hwnas.search.schedulers.base import Decision, check_directions, check_latency_first


class FullTraining:
    """The Scheduler (base.py) that never judges a trial."""

    def __init__(self, *, latency_first: bool = True, directions: Sequence[str] = ()) -> None:
        self.rungs: tuple[int, ...] = ()
        self.latency_first = check_latency_first(latency_first)
        self.directions = check_directions(directions, required=False)

    def decide(self, key: str, epoch: int, values: Sequence[float]) -> bool:
        # No rungs, so the broker never asks: a call is a programming error, not a trial to stop.
        raise RuntimeError(f"FullTraining has no rungs; decide({key!r}, {epoch}) should never be called")

    def restore(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Nothing to rebuild: full training records no decisions."""

    def counts(self) -> dict[int, dict[str, int]]:
        return {}

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return ()
