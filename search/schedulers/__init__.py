"""Schedulers: which trials go on training between epochs (see base.py for the folder's plan)."""

from __future__ import annotations

from hwnas.search.schedulers.base import Decision, Scheduler
from hwnas.search.schedulers.full import FullTraining
from hwnas.search.schedulers.moasha import MOASHA

__all__ = ["MOASHA", "Decision", "FullTraining", "Scheduler"]
