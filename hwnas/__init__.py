"""hwnas: hardware-aware neural architecture search.

The installed package maps the repository's folders: `hwnas.search` (search/), `hwnas.spaces`
(spaces/), `hwnas.evaluators` (evaluators/), `hwnas.conf` (conf/), `hwnas.scripts` (scripts/).

From Python (a notebook), the same command the shell runs::

    import hwnas
    result = hwnas.run(["search=nsga2", "n_trials=40"])
    result.trials, result.front, result.export_dir

Bad input raises `hwnas.ConfigError` (the one-line message the command line prints).
This module imports nothing heavy: Ray workers import the package too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "SweepResult", "run"]

if TYPE_CHECKING:
    from hwnas.api import SweepResult, run
    from hwnas.search.config import ConfigError


def __getattr__(name: str) -> Any:
    if name in ("run", "SweepResult"):
        from hwnas import api

        return getattr(api, name)
    if name == "ConfigError":
        from hwnas.search.config import ConfigError

        return ConfigError
    raise AttributeError(f"module 'hwnas' has no attribute {name!r}")
