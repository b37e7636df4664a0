"""`hwnas` and `hwnas-export`: Hydra-composed commands with one-line errors and exit status 2 on bad input.

We compose with Hydra's Compose API rather than `@hydra.main`: the same config groups, defaults
and override grammar, but we own the error path (one line + exit 2 before anything starts, where
`@hydra.main` prints a multi-line report and exits 1) and the output folder (`run_dir`, instead of
Hydra's `outputs/` in the current directory).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from omegaconf import DictConfig, OmegaConf

from hwnas.search.config import CONF_DIR, GROUPS, ConfigError, group_choices, validate
from hwnas.search.launch import (
    compose,
    driver_threads,
    prepare,
    prepare_data,
    prepare_teacher,
    quiet_warnings,
)

if TYPE_CHECKING:
    from hwnas.search.tracking import Tracking

USAGE = """usage: hwnas [override ...]     e.g. hwnas search=nsga2 n_trials=40 runner.max_concurrent=2 objective.latency_budget_ms=1.0
       hwnas --cfg [override ...]   print the composed config and exit
       hwnas --config-dir DIR [override ...]   also read your own config files from DIR (e.g. DIR/experiment/mine.yaml)
config groups (pick one with group=choice):
{groups}
top-level keys: experiment_name, n_trials, seed, run_dir, resume, plugins, warm_start=RUN_DIR (seed the sampler
  with an earlier sweep's trials); any key of a group as group.key=value
plugins=[mylab]: trust _target_s under the module mylab (hwnas' own classes need none)"""


def _usage() -> str:
    groups = "\n".join(f"  {g:<10} {', '.join(group_choices(g))}" for g in (*GROUPS, "experiment"))
    return USAGE.format(groups=groups)


def _load_config(path: Path, plugins: Sequence[str] = ()) -> DictConfig:
    """A run's saved config.yaml, checked as untrusted input (hwnas.search.run_folder), or a one-line
    ConfigError. `plugins`: the current command line's; the file's own are ignored."""
    from hwnas.search.run_folder import load_run_config

    return load_run_config(path, plugins)


def _plugins_arg(args: Sequence[str]) -> list[str]:
    """The `plugins=[...]` of this command line ([] when not given)."""
    given = [a.lstrip("+") for a in args if a.lstrip("+").startswith("plugins=")]
    if not given:
        return []
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist(given[-1:]))
    value = parsed["plugins"] if isinstance(parsed, dict) else None
    from hwnas.search.plugins import PluginError, check_plugins

    try:
        return list(check_plugins(value))
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    driver_threads()
    if any(a in ("-h", "--help") for a in args):
        print(_usage())
        return 0
    show_cfg = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    quiet_warnings()
    try:
        cfg = compose(args)
        if show_cfg:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        built = prepare(cfg)
        built.overrides = args
    except ConfigError as exc:
        return _fail("hwnas", str(exc))
    from hwnas.search.experiment import run_sweep

    return run_sweep(built)


def export_main(argv: Sequence[str] | None = None) -> int:
    """Re-select and re-export from a finished run: `hwnas-export run_dir=... [objective.*|select=...] [final.epochs=N]`.
    Without final.epochs nothing is trained: the chosen trial's measured file is exported."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_warnings()
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    rest = [a for a in args if not a.startswith("run_dir=")]
    if len(run_dirs) != 1 or not run_dirs[0].strip():
        return _fail("hwnas-export", "run_dir: missing; usage: hwnas-export run_dir=PATH [objective.latency_budget_ms=X] [select=knee] [final.epochs=N]")
    run_dir = Path(run_dirs[0])
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return _fail("hwnas-export", f"run_dir: {str(run_dir)!r} has no config.yaml; allowed: the run_dir of a finished sweep")
    for a in rest:
        key = a.lstrip("+").split("=", 1)[0]
        if not (key.startswith("objective.") or key.startswith("select") or key.startswith("tracking.") or key == "plugins"
                or key == FINAL_EPOCHS):
            return _fail("hwnas-export", f"{key}: cannot change at export; allowed: objective.*, select=..., tracking.*, "
                         f"plugins=[...], {FINAL_EPOCHS}=N")
    finals = [a.split("=", 1)[1] for a in rest if a.lstrip("+").split("=", 1)[0] == FINAL_EPOCHS]
    rest = [a for a in rest if a.lstrip("+").split("=", 1)[0] != FINAL_EPOCHS]
    try:
        final_epochs = _final_epochs(finals[-1]) if finals else None
    except ConfigError as exc:
        return _fail("hwnas-export", str(exc))
    try:
        base = _load_config(saved, _plugins_arg(rest))
        overrides = [a for a in rest if not a.startswith("select=")]
        cfg = base.copy()
        cfg.merge_with(OmegaConf.from_dotlist([a.lstrip("+") for a in overrides]))
        for a in rest:
            if a.startswith("select="):
                choice = a.split("=", 1)[1]
                if choice not in group_choices("select"):
                    raise ConfigError(f"select={choice}: unknown choice; allowed: {', '.join(group_choices('select'))}")
                cfg.select = OmegaConf.load(CONF_DIR / "select" / f"{choice}.yaml")
        cfg.run_dir = str(run_dir)
        cfg.resume = False
        if "cache" in cfg.hardware:
            # The export measures afresh; the sweep's cache may lie outside a moved or copied folder.
            cfg.hardware.cache = None
        validate(cfg)
        from hwnas.search.experiment import build_experiment

        built = build_experiment(cfg)
        _check_trial_log(run_dir)
        # The data the run was made with (its fingerprint is pinned in config.yaml), decoded into a
        # fresh private folder: nothing decoded in the handed-over run folder, or in a shared temp
        # folder someone else could write, is trusted (dataset.cache_dir, the user's own, is).
        private = _private_cache()
        built.data = prepare_data(built, private)
        if final_epochs is not None:
            # Final training learns from the teacher too: a trained one is trained again into the private
            # folder (or taken from the user's own compression.distill.cache_dir), as one in the handed-over
            # folder is not trusted either. Without final training the trial's file ships and no teacher is run.
            prepare_teacher(built, private)
        _check_server(cfg, run_dir)
    except ConfigError as exc:
        return _fail("hwnas-export", str(exc))
    from hwnas.evaluators.onnx_check import OnnxFileError
    from hwnas.search.export import ExportError, ExportRequest, finalize
    from hwnas.search.mlflow_model import ModelFileError
    from hwnas.search.sweep_state import STATE_FILE, SweepState
    from hwnas.search.trial_log import TrialLog

    rows = TrialLog(run_dir).rows()
    if not rows:
        return _fail("hwnas-export", f"run_dir: {str(run_dir)!r} holds no trials (trials.jsonl is missing or empty)")
    try:
        from hwnas.search.run_folder import check_run_folder

        check_run_folder(run_dir, cfg, rows)  # its records name only its own files
    except ConfigError as exc:
        return _fail("hwnas-export", str(exc))
    tracking = _saved_tracking(cfg, run_dir)
    command = SweepState.load(run_dir).command if (run_dir / STATE_FILE).is_file() else []
    request = ExportRequest(final_epochs=final_epochs, sweep_command=[str(c) for c in command],
                            export_args=[a for a in args if not a.startswith("run_dir=")])
    try:
        print(finalize(run_dir, cfg, built.objectives, rows, built.sweep.evaluator, tracking, request))
    except (ExportError, OnnxFileError, ModelFileError) as exc:  # not the file measured, or not a checked model: one line
        return _fail("hwnas-export", str(exc))
    if tracking is not None:
        tracking.flush(force=True)
    return 0


FINAL_EPOCHS = "final.epochs"
MAX_FINAL_EPOCHS = 10000


def _final_epochs(text: str) -> int:
    """`final.epochs=N` of hwnas-export: retrain the chosen candidate on train+val for N epochs."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_FINAL_EPOCHS or str(value) != text.strip():
        raise ConfigError(f"{FINAL_EPOCHS}: {text!r} is not allowed; allowed: an integer 1..{MAX_FINAL_EPOCHS} "
                          "(leave it out to export the measured file)")
    return value


def _private_cache() -> Path:
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="hwnas-export-data-"))  # mode 0700, a new name
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _check_trial_log(run_dir: Path) -> None:
    from hwnas.search.checks import check_trial_log
    from hwnas.search.trial_log import TRIALS_JSONL

    try:
        check_trial_log(run_dir / TRIALS_JSONL)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_server(cfg: DictConfig, run_dir: Path, pending_only: bool = False) -> None:
    """hwnas-export / hwnas-sync: the tracking server the folder's parent run lives on answers within
    tracking.connect_timeout_s (for sync, only when operations wait); ConfigError otherwise."""
    from hwnas.search import reach
    from hwnas.search.sweep_state import STATE_FILE
    from hwnas.search.tracking import PENDING_FILE

    try:
        talks = cfg.tracking.enabled and (run_dir / STATE_FILE).is_file()
        if talks and (not pending_only or (run_dir / PENDING_FILE).is_file()):
            reach.check_tracking(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _saved_tracking(cfg: DictConfig, run_dir: Path) -> Tracking | None:
    """The finished sweep's MLflow parent run, or None when the sweep was not tracked."""
    from hwnas.search.sweep_state import STATE_FILE, SweepState
    from hwnas.search.tracking import MlflowStore, Tracking

    if not cfg.tracking.enabled or not (run_dir / STATE_FILE).is_file():
        return None
    state = SweepState.load(run_dir)
    if state.parent_run_id is None:
        return None
    store = MlflowStore(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.registered_model)
    return Tracking(store, run_dir, state.parent_run_id)


def sync_main(argv: Sequence[str] | None = None) -> int:
    """Upload what a sweep could not log while MLflow was away: `hwnas-sync run_dir=PATH [tracking.uri=...]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_warnings()
    values = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(values) - {"run_dir", "tracking.uri", "plugins"}) + [a for a in args if "=" not in a]
    if unknown or "run_dir" not in values:
        return _fail("hwnas-sync", f"{(unknown or ['run_dir'])[0]}: not allowed or missing; usage: hwnas-sync run_dir=PATH [tracking.uri=URI] [plugins=[...]]")
    if not values["run_dir"].strip():
        return _fail("hwnas-sync", "run_dir: '' is empty; usage: hwnas-sync run_dir=PATH [tracking.uri=URI] [plugins=[...]]")
    run_dir = Path(values["run_dir"])
    if not (run_dir / "config.yaml").is_file():
        return _fail("hwnas-sync", f"run_dir: {str(run_dir)!r} has no config.yaml; allowed: the run_dir of a sweep")
    try:
        cfg = _load_config(run_dir / "config.yaml", _plugins_arg(args))
        from hwnas.search.run_folder import check_run_folder

        _check_trial_log(run_dir)  # before anything reads it as rows
        check_run_folder(run_dir, cfg)  # nothing outside the run folder is uploaded
    except ConfigError as exc:
        return _fail("hwnas-sync", str(exc))
    if "tracking.uri" in values:
        cfg.tracking.uri = values["tracking.uri"]
    try:
        cfg.run_dir = str(run_dir)
        cfg.resume = False
        validate(cfg)  # the same value rules as hwnas, for the saved config and tracking.uri=
        _check_server(cfg, run_dir, pending_only=True)
    except ConfigError as exc:
        return _fail("hwnas-sync", str(exc))
    tracking = _saved_tracking(cfg, run_dir)
    if tracking is None or not tracking.offline:
        print(f"[hwnas-sync] nothing waits in {run_dir}")
        return 0
    waiting = len(tracking.pending_path.read_text().splitlines())
    if not tracking.flush(force=True):
        left = len(tracking.pending_path.read_text().splitlines())
        print(f"[hwnas-sync] MLflow at {cfg.tracking.uri} is still unreachable: {left} of {waiting} operations wait", file=sys.stderr)
        return 1
    print(f"[hwnas-sync] {waiting} operations uploaded to {cfg.tracking.uri}")
    return 0


def run() -> NoReturn:
    """The `hwnas` command: `main`, then a prompt exit."""
    _exit(main())


def _exit(code: int) -> NoReturn:
    # When main returns, everything the sweep keeps is on disk and in MLflow (fsynced trial log,
    # tables, export, ended runs). The interpreter's own teardown after that (atexit work of Ray,
    # Tune and MLflow, finalizers of torch and Lightning) took 3.5 s of the user's wait, measured on
    # the default sweep: stop Ray ourselves and leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
