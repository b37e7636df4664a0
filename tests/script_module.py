"""Import a benchmark script as the module of the package it is (`hwnas.scripts.<name>`)."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_script(name: str) -> ModuleType:
    return importlib.import_module(f"hwnas.scripts.{name}")
