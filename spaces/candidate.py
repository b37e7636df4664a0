"""Candidates are plain, flat, JSON-serialisable dicts; their identity is a hash of the canonical form."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Keys that compress a network rather than define it: `net_id` ignores them so that the
# int8 and fp32 versions of one architecture can be paired up in reports.
COMPRESSION_KEYS = frozenset({"prune_ratio", "quant"})
# Per-stage compression parameters (`stage<k>.precision`, `stage<k>.rank_ratio`): applied to the trained
# network like `prune_ratio` and `quant` (post-training quantization per stage; factorization followed by
# the fine-tuning pruning has), so they are compression too: net_id pairs every compressed version of one
# network with its float one, and the evaluator's seed (from net_id) trains them from the same weights.
STAGE_COMPRESSION_FIELDS = frozenset({"precision", "rank_ratio"})
# Numeric formats a candidate may ask for (`quant`); evaluators.quantize produces each of them, and
# evaluators.measure.formats says on which targets each is real compute (int4: weight-only linear layers).
FORMATS = ("fp32", "fp16", "int8", "int4")


def canonical(candidate: Mapping[str, Any]) -> str:
    """Canonical JSON text: sorted keys, no whitespace, floats as JSON writes them."""
    return json.dumps(dict(candidate), sort_keys=True, separators=(",", ":"))


def arch_id(candidate: Mapping[str, Any]) -> str:
    """Stable 12-hex-digit id of the whole candidate (architecture + compression)."""
    return hashlib.sha1(canonical(candidate).encode()).hexdigest()[:12]


def is_compression_key(key: str) -> bool:
    """`prune_ratio`, `quant`, or a per-stage compression parameter such as `stage2.precision`."""
    if key in COMPRESSION_KEYS:
        return True
    stage, _, field = key.partition(".")
    return stage.startswith("stage") and stage[5:].isdigit() and field in STAGE_COMPRESSION_FIELDS


def net_id(candidate: Mapping[str, Any]) -> str:
    """Id of the architecture alone, compression knobs (`is_compression_key`) removed."""
    return arch_id({k: v for k, v in candidate.items() if not is_compression_key(k)})
