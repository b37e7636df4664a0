"""What a sweep's scheduler is: the judge that decides, between training epochs, which trials go on.

The folder splits the work in two halves. The decision half is pure and has no runner in it:
`Scheduler` (this file), `full.FullTraining` (never stops a trial) and `moasha.MOASHA` (multi-objective
asynchronous successive halving). The broker (search/broker.py) is the other half: it reports each
trial's objective values at a rung epoch to `decide`, ends the trials it stops, records every decision
(rungs.jsonl) and, on resume, hands the records back through `restore`. `latency_first.py` says which
budgets an untrained file can be held to; `accounting.py` what a sweep's scheduler spent and saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Scheduler(Protocol):
    rungs: tuple[int, ...]  # epochs after which a training trial is judged; increasing, each >= 1; () = never
    latency_first: bool  # reject candidates over a pre-training budget before training (the broker applies it)

    def decide(self, key: str, epoch: int, values: Sequence[float]) -> bool:
        """True: the trial goes on training. `key` identifies the candidate (its arch id), `values` its
        objective values at this rung (len == number of objectives, directions given at construction).
        A (key, epoch) seen before returns the decision recorded then, without changing the rung (a trial
        re-run after a driver crash must get the same answer, and must not count twice)."""
        ...

    def restore(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Rebuild the state from recorded decisions, in recorded order: each {"key": str, "epoch": int,
        "values": list[float], "keep": bool}. After restore, decide() on a recorded (key, epoch) replays it."""
        ...

    def counts(self) -> dict[int, dict[str, int]]:
        """Per rung epoch: {"judged": n, "stopped": m} so far."""
        ...


@dataclass(frozen=True)
class Decision:
    """One judgement at a rung, as recorded (rungs.jsonl) and restored."""

    key: str
    epoch: int
    values: tuple[float, ...]
    keep: bool

    def to_record(self) -> dict[str, Any]:
        return {"key": self.key, "epoch": self.epoch, "values": list(self.values), "keep": self.keep}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Decision:
        """ValueError (one line, naming the record) when a field is missing or of the wrong kind."""
        try:
            keep = record["keep"]
            if not isinstance(keep, bool):
                raise TypeError(f"keep {keep!r} is not a bool")
            return cls(str(record["key"]), int(record["epoch"]), tuple(float(v) for v in record["values"]), keep)
        except (KeyError, TypeError, ValueError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(
                f"scheduler record {dict(record)!r} is not allowed ({why}); allowed: "
                '{"key": str, "epoch": int, "values": list of numbers, "keep": bool}'
            ) from None


# ----------------------------------------------------------------------------- checks shared by the schedulers


def check_latency_first(latency_first: Any) -> bool:
    if not isinstance(latency_first, bool):
        raise ValueError(f"scheduler.latency_first: {latency_first!r} is not allowed; allowed: true or false")
    return latency_first


def check_directions(directions: Sequence[str], *, required: bool) -> tuple[str, ...]:
    """The objectives' directions as a tuple; `required`: at least one."""
    found = (directions,) if isinstance(directions, str) else tuple(directions)
    if (required and not found) or any(d not in ("max", "min") for d in found):
        need = "a non-empty list" if required else "a list"
        raise ValueError(f"scheduler.directions: {list(found)!r} is not allowed; allowed: {need} of 'max' or 'min'")
    return found
