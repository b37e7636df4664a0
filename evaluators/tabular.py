"""Evaluate a candidate by looking it up in a table of measured numbers (e.g. NAS-Bench-201 + latency).

Nothing is trained or timed: a sweep of thousands of trials takes seconds, which is what
benchmarking search strategies needs. The table is read once, at construction, so a bad path or
column is reported before the sweep starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from hwnas.evaluators.base import Evaluation

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


class UnknownCandidateError(KeyError):
    """A candidate the table has no row for."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0])


class NamedSpace(Protocol):
    def name(self, candidate: Mapping[str, Any]) -> str: ...


class HasNames(Protocol):
    names: tuple[str, ...]


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet table, chosen by the file's suffix."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"table {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"table {str(path)!r} does not exist; allowed: an existing CSV or Parquet file")
    return reader(path)


class TabularEvaluator:
    """Candidate -> the numeric columns of the table row whose `key` column equals `space.name(candidate)`."""

    def __init__(self, table: str, key: str, space: NamedSpace, objectives: HasNames | None = None) -> None:
        self.table = str(table)
        self.key = key
        self.space = space
        frame = read_table(table)
        if key not in frame.columns:
            raise ValueError(f"table {self.table!r} has no key column {key!r}; columns: {', '.join(map(str, frame.columns))}")
        numeric = [c for c in frame.columns if c != key and pd.api.types.is_numeric_dtype(frame[c])]
        self._metric_names = tuple(str(c) for c in numeric)
        duplicated = frame[key][frame[key].duplicated()]
        if len(duplicated):
            raise ValueError(f"table {self.table!r}: key {duplicated.iloc[0]!r} appears more than once in column {key!r}; allowed: unique keys")
        values = frame[numeric].astype(float).to_numpy()
        # One dict look-up per evaluation: thousands of trials must cost milliseconds, not a scan each.
        self._rows = {
            str(k): dict(zip(self._metric_names, map(float, row), strict=True))
            for k, row in zip(frame[key], values, strict=True)
        }
        if objectives is not None:
            for name in objectives.names:
                if name not in self._metric_names:
                    raise ValueError(
                        f"objective metric {name!r} is not a numeric column of table {self.table!r}; "
                        f"allowed: {', '.join(self._metric_names)}"
                    )

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The table's numeric columns (the key column excluded): what `evaluate` reports."""
        return self._metric_names

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> list[str]:
        return list(self._rows)

    def lookup(self, name: str) -> dict[str, float]:
        try:
            return dict(self._rows[name])
        except KeyError:
            raise UnknownCandidateError(f"{self.key} {name!r} is not in table {self.table!r} ({len(self._rows)} rows)") from None

    def evaluate(self, candidate: dict[str, Any], trial_dir: Path, deadline: float | None = None) -> Evaluation:
        """The row's numbers; nothing is written to `trial_dir` and there is no model file."""
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"trial deadline passed before the look-up of {self.space.name(candidate)!r}")
        return Evaluation(metrics=self.lookup(self.space.name(candidate)), artifact=None)
