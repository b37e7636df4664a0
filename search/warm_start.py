"""Warm starts: a new sweep's Optuna study begins with an earlier sweep's finished trials.

`warm_start=RUN_DIR` (a top-level key: it is the study's history, not a setting of the sampler, and the
`search` group holds only the sampler's constructor arguments) names the run folder of an earlier sweep.
Its COMPLETE trials (trials.jsonl) are added to the new study, with their objective values (and the new
sweep's budgets as constraint values), so the sampler learns from them from the first trial. They are
not evaluations of the new sweep: they carry the user attribute `warm_start=<run dir>`, are not in its
trials.jsonl / trials.csv, do not count toward n_trials, and the broker does not answer a repeated
candidate with their numbers (latency on a new device differs: a repeat is measured again).

The folder is untrusted input (hwnas.search.run_folder): its config.yaml is loaded with checked targets
and no interpolation, its trials.jsonl line by line (hwnas.search.checks.check_trial_log), every field
used is type-checked, and each candidate is replayed through this sweep's space (`suggest` on an
in-memory study with the candidate enqueued): the distributions of the added trials are the space's own,
and a candidate the space would not propose is refused. Checked before any work (`check_warm_start`,
from config.validate for a new sweep); seeded once, when the study is created (`seed_study`): a resumed
study already holds them. There the space is the one fitted to this sweep's data: a candidate it no
longer holds (another input size) is left out with a note. The data, device, budgets and sampler may
differ from the earlier sweep's (continuing on a new device or budget is the point); the space may not.
The seeded trials take the study's first numbers, so this sweep's own trials start after them.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from hwnas.search.config import ConfigError
from hwnas.search.objectives import Objectives
from hwnas.search.study_record import WARM_START

KEY = "warm_start"
NUMBER_ATTR = "warm_start_number"  # the trial's number in the earlier sweep
ALLOWED = "the run_dir of an earlier sweep of the same space (config.yaml and trials.jsonl), or null"
SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class Seed:
    """One earlier COMPLETE trial: its number there, its candidate and its metrics."""

    number: int
    candidate: dict[str, Any]
    metrics: dict[str, float]


def _refuse(message: str) -> ConfigError:
    return ConfigError(f"{KEY}: {message}")


def _first_difference(a: Any, b: Any, prefix: str = "space") -> str | None:
    """The first dotted key (sorted) where two resolved config trees differ; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{prefix}.{key}"
            found = _first_difference(a[key], b[key], f"{prefix}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{prefix}[{i}]")
            if found is not None:
                return found
        return None
    same = type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                                  and not isinstance(b, bool))
    return None if same and a == b else prefix


def load_seeds(run_dir: Path, space: Mapping[str, Any], objectives: Objectives, plugins: Sequence[str] = ()) -> list[Seed]:
    """The earlier sweep's COMPLETE trials, after every check; ConfigError (one line) on the first problem.

    `space`: this sweep's resolved `space` node; the earlier sweep's must be equal."""
    from hwnas.search.checks import check_trial_log
    from hwnas.search.run_folder import load_run_config
    from hwnas.search.trial_log import COMPLETE, TRIALS_JSONL

    if not run_dir.is_dir():
        raise _refuse(f"{str(run_dir)!r} is not a folder; allowed: {ALLOWED}")
    config, log = run_dir / "config.yaml", run_dir / TRIALS_JSONL
    if not config.is_file() or not log.is_file():
        missing = "config.yaml" if not config.is_file() else TRIALS_JSONL
        raise _refuse(f"{str(run_dir)!r} has no {missing}; allowed: {ALLOWED}")
    try:
        saved = load_run_config(config, plugins)
    except ConfigError as exc:
        raise _refuse(str(exc)) from None
    saved_space = saved.get("space")
    if not isinstance(saved_space, DictConfig):
        raise _refuse(f"{config} has no space mapping; allowed: {ALLOWED}")
    differ = _first_difference(OmegaConf.to_container(saved_space, resolve=False), dict(space))
    if differ is not None:
        raise _refuse(f"{str(run_dir)!r} searched another space: {differ} differs; allowed: {ALLOWED}")
    try:
        check_trial_log(log)
    except ValueError as exc:
        raise _refuse(str(exc)) from None
    from hwnas.search.trial_log import TrialLog

    seeds: list[Seed] = []
    for row in TrialLog(run_dir).rows():
        where = f"{log}: trial {row.get('number')!r}"
        number, candidate, metrics = row.get("number"), row.get("candidate"), row.get("metrics")
        if not isinstance(number, int) or isinstance(number, bool):
            raise _refuse(f"{where} has no integer number; allowed: the trials.jsonl hwnas wrote")
        if row.get("status") != COMPLETE:
            continue  # a failed trial has no values to learn from
        if not isinstance(candidate, dict) or not candidate or not all(
            isinstance(k, str) and isinstance(v, SCALARS) for k, v in candidate.items()
        ):
            raise _refuse(f"{where} candidate is not a mapping of parameters; allowed: the trials.jsonl hwnas wrote")
        if not isinstance(metrics, dict):
            raise _refuse(f"{where} metrics is not a mapping; allowed: the trials.jsonl hwnas wrote")
        for name in objectives.names:
            value = metrics.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _refuse(f"{where} has no finite {name} (an objective of this sweep); allowed: a sweep that "
                              f"reported {', '.join(objectives.names)}")
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        seeds.append(Seed(number, dict(candidate), numeric))
    if not seeds:
        raise _refuse(f"{str(run_dir)!r} holds no COMPLETE trial; allowed: {ALLOWED}")
    return seeds


class _Traced:
    """A trial that remembers the name of the parameter it was last asked to suggest."""

    def __init__(self, trial: optuna.Trial) -> None:
        self._trial = trial
        self.current: str | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return attr

        def suggest(param: str, *args: Any, **kwargs: Any) -> Any:
            self.current = param
            return attr(param, *args, **kwargs)

        return suggest


def replay(seeds: Sequence[Seed], space: Any, objectives: Objectives, source: str) -> tuple[list[optuna.trial.FrozenTrial], list[str]]:
    """Each seed replayed through `space.suggest` on an in-memory study with its candidate enqueued:
    (the trials to add, with the space's distributions, values and constraint values; one note per seed
    the space would not propose, e.g. a stage count this input cannot hold)."""
    from hwnas.search.constraints import _KEY as CONSTRAINT_KEY

    scratch = optuna.create_study(directions=objectives.optuna_directions, sampler=optuna.samplers.RandomSampler(seed=0))
    trials, notes = [], []
    for seed in seeds:
        scratch.enqueue_trial(seed.candidate, skip_if_exists=False)
        trial = scratch.ask()
        traced = _Traced(trial)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a value outside a distribution is caught below
                candidate = space.suggest(traced)
            params, distributions = dict(trial.params), dict(trial.distributions)
            bad = next((k for k, v in params.items()
                        if not distributions[k]._contains(distributions[k].to_internal_repr(v))), None)
        except Exception as exc:  # noqa: BLE001 - an untrusted value the space refuses, whatever it raises
            key = traced.current  # the parameter being suggested when it raised
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            what = f"{key}={seed.candidate.get(key)!r}" if key is not None else "its candidate"
            notes.append(f"trial {seed.number}: {what} is not a candidate of this space ({reason})")
            scratch.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        scratch.tell(trial, state=optuna.trial.TrialState.FAIL)
        if bad is not None or candidate != seed.candidate:
            key = bad or next((k for k in sorted(set(candidate) | set(seed.candidate))
                               if candidate.get(k) != seed.candidate.get(k)), "?")
            notes.append(f"trial {seed.number}: {key}={seed.candidate.get(key)!r} is not a candidate of this space")
            continue
        constraints = objectives.constraints(seed.metrics) or {}
        trials.append(optuna.trial.create_trial(
            params=params, distributions=distributions, values=objectives.values(seed.metrics),
            user_attrs={WARM_START: source, NUMBER_ATTR: seed.number},
            system_attrs={CONSTRAINT_KEY + name: float(v) for name, v in constraints.items()},
        ))
    return trials, notes


def check_warm_start(cfg: DictConfig, plugins: Sequence[str] = ()) -> None:
    """config.validate: `warm_start` is null, or an earlier sweep of this space whose COMPLETE trials
    report the objectives and are candidates of the space. Only for a new sweep: a resumed sweep (or an
    export) has its run folder's config.yaml, and its study already holds the seeded trials."""
    value = cfg.get(KEY)
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise _refuse(f"{value!r} is not a folder; allowed: {ALLOWED}")
    if (Path(cfg.run_dir) / "config.yaml").is_file():
        return
    run_dir = Path(value)
    if run_dir.resolve() == Path(cfg.run_dir).resolve():
        raise _refuse(f"{value!r} is this sweep's own run_dir; allowed: {ALLOWED}")
    objectives = Objectives.from_config(OmegaConf.to_container(cfg.objective, resolve=True))  # type: ignore[arg-type]
    seeds = load_seeds(run_dir, OmegaConf.to_container(cfg.space, resolve=True), objectives, plugins)  # type: ignore[arg-type]
    try:
        from hydra.utils import instantiate

        space = instantiate(cfg.space)
    except Exception:  # noqa: BLE001 - a space that does not build is refused by build_experiment, naming its key
        return
    _, notes = replay(seeds, space, objectives, str(run_dir.resolve()))
    if notes:
        raise _refuse(f"{run_dir / 'trials.jsonl'}: {notes[0]}; allowed: the trials.jsonl hwnas wrote for this space")


def seed_study(study: optuna.Study, warm_start: str | Path | None, space: Any, objectives: Objectives,
               plugins: Sequence[str] = ()) -> int:
    """Add the earlier sweep's trials to a new study; returns how many. Nothing for a study that already
    has trials (resumed: seeded when it was created). The space here is fitted to the data: a candidate
    it no longer holds (another input size) is left out, with a note."""
    if warm_start is None or study.get_trials(deepcopy=False):
        return 0
    run_dir = Path(warm_start)
    seeds = load_seeds_unchecked_space(run_dir, objectives, plugins)
    trials, notes = replay(seeds, space, objectives, str(run_dir.resolve()))
    for note in notes:
        print(f"[hwnas] warm start: {note}; not seeded", file=sys.stderr)
    study.add_trials(trials)
    print(f"[hwnas] warm start: {len(trials)} trial(s) of {run_dir} seed the sampler (not counted as evaluations)")
    return len(trials)


def load_seeds_unchecked_space(run_dir: Path, objectives: Objectives, plugins: Sequence[str] = ()) -> list[Seed]:
    """load_seeds with the earlier sweep's own space as the reference (config.validate compared it with
    this sweep's before any work)."""
    from hwnas.search.run_folder import load_run_config

    try:
        saved = load_run_config(run_dir / "config.yaml", plugins)
    except ConfigError as exc:
        raise _refuse(str(exc)) from None
    return load_seeds(run_dir, OmegaConf.to_container(saved.space, resolve=False), objectives, plugins)  # type: ignore[arg-type]
