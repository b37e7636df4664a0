"""`hwnas.run([...])`: the `hwnas` command as a Python call, for notebooks and scripts.

Same overrides, same validation, same run folder; bad input raises `ConfigError` (the line the
command prints) instead of exiting, and the sweep's tables come back as DataFrames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class SweepResult:
    run_dir: Path
    trials: pd.DataFrame  # trials.csv: one row per trial
    front: pd.DataFrame  # pareto.csv: the feasible non-dominated trials
    export_dir: Path | None  # export/ (model.onnx, model_card.json), None when nothing was feasible


def run(overrides: Sequence[str] = ()) -> SweepResult:
    """Run (or resume) a sweep, e.g. `hwnas.run(["search=nsga2", "n_trials=40"])`.

    Raises `hwnas.ConfigError` on bad input (before anything starts), KeyboardInterrupt when
    interrupted (finished trials are kept; `resume=true` continues), RuntimeError when the sweep
    ended without its results.
    """
    import pandas as pd

    from hwnas.search.experiment import run_sweep
    from hwnas.search.export import EXPORT_DIR
    from hwnas.search.launch import compose, driver_threads, prepare, quiet_warnings

    driver_threads()
    quiet_warnings()
    if isinstance(overrides, str):
        raise TypeError("overrides: a list of strings such as ['search=nsga2', 'n_trials=40'], not one string")
    cfg = compose(list(overrides))
    built = prepare(cfg)
    built.overrides = list(overrides)
    status = run_sweep(built)
    if status == 130:
        raise KeyboardInterrupt
    run_dir = Path(cfg.run_dir)
    if status != 0:
        raise RuntimeError(f"hwnas: the sweep in {run_dir} ended with status {status}; finished trials are kept there")
    export = run_dir / EXPORT_DIR
    return SweepResult(
        run_dir=run_dir,
        trials=pd.read_csv(run_dir / "trials.csv"),
        front=pd.read_csv(run_dir / "pareto.csv"),
        export_dir=export if (export / "model_card.json").is_file() else None,
    )
