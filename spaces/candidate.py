"""Candidates are plain, flat, JSON-serialisable dicts; their identity is a hash of the canonical form."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Keys that compress a network rather than define it: `net_id` ignores them so that the
# int8 and fp32 versions of one architecture can be paired up in reports.
COMPRESSION_KEYS = frozenset({"prune_ratio", "quant"})
# Numeric formats a candidate may ask for (`quant`); evaluators.quantize produces each of them, and
# evaluators.measure.formats says on which targets each is real compute (int4: weight-only linear layers).
FORMATS = ("fp32", "fp16", "int8", "int4")


def canonical(candidate: Mapping[str, Any]) -> str:
    """Canonical JSON text: sorted keys, no whitespace, floats as JSON writes them."""
    return json.dumps(dict(candidate), sort_keys=True, separators=(",", ":"))


def arch_id(candidate: Mapping[str, Any]) -> str:
    """Stable 12-hex-digit id of the whole candidate (architecture + compression)."""
    return hashlib.sha1(canonical(candidate).encode()).hexdigest()[:12]


def net_id(candidate: Mapping[str, Any]) -> str:
    """Id of the architecture alone, compression knobs removed."""
    return arch_id({k: v for k, v in candidate.items() if k not in COMPRESSION_KEYS})
