"""Latency cache: one SQLite file, keyed by (sha256 of the ONNX bytes, device id, protocol key).

An identical file is never timed twice on the same device with the same protocol, across trials and
sweeps. Several processes (Ray workers on one node) may read and write one file at once: WAL
journal, a busy timeout, and each write its own short transaction (INSERT OR REPLACE: the newest
measurement of a key wins). A row that no longer parses is skipped with a warning, never raised:
a sweep must not die on one bad cache row. `table()` is the "latency table for my hardware".
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

if TYPE_CHECKING:  # the driver imports file_sha256 from here: ONNX Runtime stays out of that import
    from hwnas.evaluators.measure.protocol import Measurement

T = TypeVar("T")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000
TABLE_COLUMNS = (
    "arch", "latency_ms", "p90_ms", "p99_ms", "cv", "device_id", "cpu_model", "provider", "protocol_key",
    "sha256", "space", "candidate",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS hwnas_latency_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hwnas_latency (
    sha256 TEXT NOT NULL, device_id TEXT NOT NULL, protocol_key TEXT NOT NULL,
    measurement TEXT NOT NULL, arch TEXT NOT NULL, candidate TEXT NOT NULL, space TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (sha256, device_id, protocol_key)
);
"""


def measurement_to_dict(m: Any) -> dict[str, Any]:
    if isinstance(m, Mapping):
        d = dict(m)
    elif hasattr(m, "to_dict"):
        d = m.to_dict()
    else:
        raise TypeError(f"measurement: {type(m).__name__} is not a Measurement; allowed: protocol.Measurement or its to_dict()")
    median = d.get("median_ms")
    if isinstance(median, bool) or not isinstance(median, (int, float)) or not median > 0:
        raise ValueError(f"measurement.median_ms: {median!r} is not a latency; allowed: a positive number of ms")
    return d


def measurement_from_dict(d: dict[str, Any], *, source: str = "cache") -> Measurement:
    """The stored Measurement, marked where it came from (source "cache")."""
    from hwnas.evaluators.measure.protocol import Measurement

    return Measurement.from_dict({**d, "source": source})


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _when_unlocked(work: Callable[[], T]) -> T:
    """`work`, tried again while SQLite answers "database is locked" without waiting (it does so while
    another process creates the file or switches it to WAL), up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.02
    while True:
        try:
            return work()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.5)


class LatencyCache:
    """get/put measurements; `table()` exports them, `devices()` lists the devices in the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"latency cache: {str(self.path)!r} is a folder; allowed: an SQLite file (new or made by hwnas)")
        if self.path.exists():
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise ValueError(f"latency cache: {str(self.path)!r} is not an SQLite file; allowed: an SQLite file (new or made by hwnas)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        try:
            version = _when_unlocked(self._create)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"latency cache: {str(self.path)!r} cannot be used ({exc}); allowed: an SQLite file made by hwnas") from None
        if version != str(SCHEMA_VERSION):
            raise ValueError(f"latency cache: {str(self.path)!r} has schema {version}; allowed: {SCHEMA_VERSION}")

    def __getstate__(self) -> dict[str, Any]:
        # Shipped to Ray workers inside the evaluator: each process opens its own connection.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._conn, self._lock = state["path"], None, threading.Lock()

    def _create(self) -> str:
        """The tables, made or checked under the write lock taken up front (BEGIN IMMEDIATE waits on the
        busy timeout; a read lock upgraded later could fail at once), then WAL, which the file keeps."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "hwnas_latency" not in tables:
                raise ValueError(
                    f"latency cache: {str(self.path)!r} is an SQLite file of something else (tables: "
                    f"{', '.join(sorted(tables))[:80]}); allowed: a latency cache made by hwnas, or a new path"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO hwnas_latency_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = str(conn.execute("SELECT value FROM hwnas_latency_meta WHERE key='schema_version'").fetchone()[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # WAL: readers never block the one writer; a killed writer leaves no half row. Needs a local file system.
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        return version

    def _connect(self) -> sqlite3.Connection:
        """This process's one connection, opened on first use and kept: opening and closing one per call
        made every close a checkpoint that a concurrent open could meet as "database is locked"."""
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn

    def get(self, sha256: str, device_id: str, protocol_key: str) -> Measurement | None:
        """The cached Measurement (source "cache") of this file on this device with this protocol, or None."""
        with self._lock:
            conn = self._connect()
            row = conn.execute(
                "SELECT measurement FROM hwnas_latency WHERE sha256=? AND device_id=? AND protocol_key=?",
                (sha256, device_id, protocol_key),
            ).fetchone()
        if row is None:
            return None
        try:
            return measurement_from_dict(json.loads(row[0]))
        except (ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"latency cache {self.path}: row {sha256[:12]}/{device_id}/{protocol_key} is corrupt ({exc}); measuring again",
                          stacklevel=2)
            return None

    def put(
        self, sha256: str, device_id: str, protocol_key: str, m: Any, *, arch: str, candidate: Mapping[str, Any], space: str
    ) -> None:
        if not (isinstance(sha256, str) and len(sha256) == 64):
            raise ValueError(f"sha256: {sha256!r} is not a SHA-256 hex digest; allowed: file_sha256(onnx_path)")
        for key, value in (("device_id", device_id), ("protocol_key", protocol_key), ("arch", arch), ("space", space)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key}: {value!r} is empty; allowed: a non-empty string")
        record = json.dumps(measurement_to_dict(m), sort_keys=True)
        cand = json.dumps(dict(candidate), sort_keys=True)
        with self._lock:
            conn = self._connect()
            conn.execute(
                "INSERT OR REPLACE INTO hwnas_latency VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sha256, device_id, protocol_key, record, arch, cand, space, time.time()),
            )

    def devices(self) -> list[str]:
        with self._lock:
            conn = self._connect()
            return [r[0] for r in conn.execute("SELECT DISTINCT device_id FROM hwnas_latency ORDER BY device_id")]

    def __len__(self) -> int:
        with self._lock:
            conn = self._connect()
            return int(conn.execute("SELECT COUNT(*) FROM hwnas_latency").fetchone()[0])

    def table(self, device_id: str | None = None) -> pd.DataFrame:
        """One row per cached measurement (columns TABLE_COLUMNS), oldest first; corrupt rows skipped with a warning."""
        query = "SELECT sha256, device_id, protocol_key, measurement, arch, candidate, space FROM hwnas_latency"
        args: tuple[str, ...] = ()
        if device_id is not None:
            query, args = query + " WHERE device_id=?", (device_id,)
        with self._lock:
            conn = self._connect()
            rows = conn.execute(query + " ORDER BY created, rowid", args).fetchall()
        out = []
        bad = 0
        for sha, dev, proto, meas, arch, cand, space in rows:
            try:
                m = json.loads(meas)
                latency = float(m["median_ms"])
                if not latency > 0:
                    raise ValueError("median_ms <= 0")
                fingerprint = m.get("fingerprint") or {}
                out.append({
                    "arch": arch, "latency_ms": latency, "p90_ms": _num(m.get("p90_ms")), "p99_ms": _num(m.get("p99_ms")),
                    "cv": _num(m.get("cv")), "device_id": dev,
                    "cpu_model": str(fingerprint.get("cpu_model", "")) if isinstance(fingerprint, dict) else "",
                    "provider": str(m.get("provider", "")), "protocol_key": proto, "sha256": sha, "space": space,
                    "candidate": json.dumps(json.loads(cand), sort_keys=True),
                })
            except (ValueError, TypeError, KeyError, AttributeError):
                bad += 1
        if bad:
            warnings.warn(f"latency cache {self.path}: {bad} corrupt row(s) skipped", stacklevel=2)
        return pd.DataFrame(out, columns=list(TABLE_COLUMNS))


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")
