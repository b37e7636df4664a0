"""Never spend an evaluation twice on the same candidate: a study-wide record keyed by arch_id.

A sampler may propose a candidate that was already evaluated (TPE does, late in a sweep). The runner
then answers it from this record - the sampler is told the recorded values, so it still learns - and
asks again, without training anything. Candidates still being evaluated are held too, so two
parallel trials never evaluate the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence


class EvaluationRecord:
    def __init__(self, max_streak: int) -> None:
        # After this many duplicates in a row the space is taken as exhausted: evaluate anyway.
        self.max_streak = max_streak
        self.values: dict[str, tuple[float, ...]] = {}
        self.pending: set[str] = set()
        self.streak = 0

    def known(self, arch: str) -> tuple[float, ...] | None:
        return self.values.get(arch)

    def is_pending(self, arch: str) -> bool:
        return arch in self.pending

    def exhausted(self) -> bool:
        return self.streak >= self.max_streak

    def hit(self) -> None:
        self.streak += 1

    def start(self, arch: str) -> None:
        self.streak = 0
        self.pending.add(arch)

    def complete(self, arch: str, values: Sequence[float] | None) -> None:
        self.pending.discard(arch)
        if values is not None:
            self.values[arch] = tuple(float(v) for v in values)
