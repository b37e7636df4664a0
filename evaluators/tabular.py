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


TABLE_ALLOWED = "a CSV (.csv, text with a header row) or Parquet (.parquet, .pq) file with a key column and numeric metric columns"


def _bad_table(path: Path, problem: str) -> ValueError:
    return ValueError(f"evaluator.table: {str(path)!r} {problem}; allowed: {TABLE_ALLOWED}")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet table, chosen by the file's suffix; a one-line ValueError naming
    evaluator.table and the file for anything else (a folder, binary garbage, no rows)."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"evaluator.table: {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(READERS)} ({TABLE_ALLOWED})")
    if path.is_dir():
        raise _bad_table(path, "is a folder")
    if not path.is_file():
        raise FileNotFoundError(f"evaluator.table: {str(path)!r} does not exist; allowed: {TABLE_ALLOWED}")
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
            size = f.seek(0, 2)
    except OSError as exc:
        raise _bad_table(path, f"cannot be read ({exc.strerror})") from None
    if size == 0:
        raise _bad_table(path, "is empty")
    if reader is pd.read_csv:
        if b"\x00" in head:
            raise _bad_table(path, "is not a text CSV file (it holds binary bytes)")
        try:
            head.decode("utf-8") if size <= len(head) else head[: head.rfind(b"\n") + 1 or len(head)].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_table(path, "is not a UTF-8 text CSV file") from None
    elif not head.startswith(b"PAR1"):
        raise _bad_table(path, "is not a Parquet file (no PAR1 header)")
    try:
        frame = reader(path)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many kinds; one line names the file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _bad_table(path, f"cannot be read as a table ({type(exc).__name__}: {reason[:120]})") from None
    if len(frame) == 0:
        raise _bad_table(path, "has no rows")
    return frame


class TabularEvaluator:
    """Candidate -> the numeric columns of the table row whose `key` column equals `space.name(candidate)`."""

    def __init__(self, table: str, key: str, space: NamedSpace, objectives: HasNames | None = None) -> None:
        self.table = str(table)
        self.key = key
        self.space = space
        if getattr(space, "train", None):  # a table was made with one training recipe: knobs would do nothing
            raise ValueError("space.train: training knobs are set (space.train or space.distill), but a benchmark "
                             "table trains nothing; allowed: space.train=null and space.distill=null with evaluator=tabular")
        if not isinstance(table, (str, Path)) or not str(table).strip():
            raise ValueError(f"evaluator.table: {table!r} is not allowed; allowed: the path of {TABLE_ALLOWED}")
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"evaluator.key: {key!r} is not allowed; allowed: the name of the table's key column")
        frame = read_table(table)
        if key not in frame.columns:
            raise ValueError(
                f"evaluator.table: {self.table!r} has no key column {key!r} (evaluator.key); allowed: one of its columns: "
                f"{', '.join(map(str, frame.columns))[:200]}"
            )
        numeric = [c for c in frame.columns if c != key and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
        self._metric_names = tuple(str(c) for c in numeric)
        if not numeric:
            raise ValueError(f"evaluator.table: {self.table!r} has no numeric metric column besides {key!r}; allowed: {TABLE_ALLOWED}")
        duplicated = frame[key][frame[key].duplicated()]
        if len(duplicated):
            raise ValueError(
                f"evaluator.table: {self.table!r}: key {duplicated.iloc[0]!r} appears more than once in column {key!r}; allowed: unique keys"
            )
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
                        f"evaluator.table: {self.table!r}: objective metric {name!r} is not a numeric column; "
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
