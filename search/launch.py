"""From overrides to a sweep ready to run: compose, validate, build, start the runner.

The one path every entry takes (`hwnas`, `python -m hwnas`, `hwnas.run([...])` in a notebook), so
each gets the same validation and the same one-line `ConfigError` before anything starts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from hwnas.search.config import ConfigError, compose_config, validate

if TYPE_CHECKING:
    from hwnas.search.experiment import Built


def driver_threads() -> None:
    # The cores belong to the trials; the driver's own torch work (GP sampler fits, export checks)
    # runs single-threaded, which also makes GP 10x faster than fighting running trials for cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def quiet_warnings() -> None:
    # Library deprecation notices are for us, not for the researcher reading the sweep's output.
    import warnings

    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*experimental feature.*")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def compose(overrides: Sequence[str]) -> DictConfig:
    """The composed, validated config; ConfigError on the first problem."""
    cfg = compose_config(list(overrides))
    validate(cfg)
    return cfg


def prepare(cfg: DictConfig) -> Built:
    """Build the sweep and start its runner (Ray); ConfigError before anything is written.

    Order: the values (`compose`), the run folder and every object the sweep needs (checked, not
    created), then whether the tracking server and the Ray address answer (each bounded by its
    connect_timeout_s); only then anything with a side effect: Ray starts, and after it the run
    folder and the MLflow store (`run_sweep`)."""
    from hwnas.search.experiment import build_experiment, prepare_run_dir
    from hwnas.search.reach import check_reachable

    prepare_run_dir(cfg)
    built = build_experiment(cfg)
    try:
        check_reachable(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    start = getattr(built.runner, "start", None)
    if start is not None:
        warm = _warm_up(cfg)
        try:
            start()  # join or start Ray and check the cluster before anything is written
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        finally:
            warm.join()
    return built


def _warm_up(cfg: DictConfig) -> threading.Thread:
    """While Ray starts (seconds of waiting on its processes): import what the sweep needs next
    (Ray Tune's side, MLflow and its SQL store). Imports only: `start()` may still refuse the
    config (runner.storage on a cluster, GPUs), so no database, folder or experiment is made here."""

    def warm() -> None:
        import hwnas.search.runners.ray_search  # noqa: F401  (Ray Tune: ~2 s of imports)

        if not cfg.tracking.enabled:
            return
        import hwnas.search.tracking  # noqa: F401  (MLflow's client)

        if str(cfg.tracking.uri).startswith("sqlite:"):
            try:
                import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (SQLAlchemy, alembic)
            except Exception:  # noqa: BLE001 - only a head start; the sweep's own import reports problems
                pass

    thread = threading.Thread(target=warm, name="hwnas-warm-up", daemon=True)
    thread.start()
    return thread
