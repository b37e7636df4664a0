"""From overrides to a sweep ready to run: compose, validate, build, start the runner.

The one path every entry takes (`hwnas`, `python -m hwnas`, `hwnas.run([...])` in a notebook), so
each gets the same validation and the same one-line `ConfigError` before anything starts.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, open_dict

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
    connect_timeout_s); then the data (read, checked and decoded once into its cache: bad data is
    refused here); only then Ray starts, and after it the run folder's records and the MLflow store
    (`run_sweep`). A refusal after the data cache was written removes the run folder it made."""
    from hwnas.search.experiment import build_experiment, check_same_device, prepare_run_dir
    from hwnas.search.reach import check_reachable

    prepare_run_dir(cfg)
    built = build_experiment(cfg)
    if cfg.resume:
        check_same_device(Path(cfg.run_dir), built.hardware)
    if built.hardware is not None:
        print(f"[hwnas] latency: {describe_hardware(built.hardware)}")
        mismatch = (built.hardware.get("predictor") or {}).get("host_mismatch")
        if mismatch:
            print(f"[hwnas] warning: {mismatch}", file=sys.stderr)
    try:
        check_reachable(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cache_root = data_cache_root(cfg, built.runner)
    # Folders this call creates (the run folder; on a cluster also its folder in runner.storage):
    # removed again if the sweep is refused before it starts.
    made = [d for d in dict.fromkeys((Path(cfg.run_dir), cache_root.parent)) if not d.exists()]
    try:
        built.data = prepare_data(built, cache_root)
        prepare_teacher(built, cache_root)
        start = getattr(built.runner, "start", None)
        if start is not None:
            warm = _warm_up(cfg)
            try:
                start()  # join or start Ray and check the cluster before anything is written
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            finally:
                warm.join()
    except BaseException:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return built


def data_cache_root(cfg: DictConfig, runner: Any) -> Path:
    """Where the decoded data lives: beside the trials, so every node that sees them sees it
    (`runner.storage` on a cluster, else the run folder); `dataset.cache_dir` overrides both."""
    storage = getattr(runner, "storage", None)
    run_dir = Path(cfg.run_dir)
    return (Path(storage).resolve() / run_dir.resolve().name if storage else run_dir) / "data"


def prepare_data(built: Built, cache_root: Path) -> dict[str, Any] | None:
    """Read, check, split, fingerprint and decode the evaluator's data once, in the driver, into
    `cache_root`; fit the space to its input shape; pin the fingerprint in the config (config.yaml,
    MLflow, resume's drift check). None when the evaluator reads no data (a benchmark table)."""
    from hwnas.evaluators.data import CachedData, DataError
    from hwnas.spaces.base import fit_input

    data = getattr(built.sweep.evaluator, "data", None)
    if data is None or not hasattr(data, "prepare"):
        return None
    notes: list[str] = []

    def fit(shape: tuple[int, int, int]) -> None:
        notes.extend(fit_input(built.sweep.space, shape))

    try:
        if isinstance(data, CachedData):
            summary: dict[str, Any] = data.prepare(cache_root, check_shape=fit)  # refused before decoding
        else:
            summary = data.prepare(cache_root)
            fit(data.input_shape)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # the space cannot hold this input at all
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # a source file that cannot be read, a cache folder that cannot be written
        raise ConfigError(_data_os_error(exc, built.cfg)) from None
    for note in notes:
        print(f"[hwnas] {note}")
    if "fingerprint" in built.cfg.dataset:
        with open_dict(built.cfg):
            built.cfg.dataset.fingerprint = summary["fingerprint"]
    print(f"[hwnas] data: {describe_data(summary)}")
    return summary


def prepare_teacher(built: Built, cache_root: Path) -> dict[str, Any] | None:
    """The distillation teacher (compression.distill.teacher), once the data is known: a user's file checked
    against the data, or one trained on the train split into `cache_root`/teachers (reused when there).
    Trials record its sha256 with their training settings (training.distill). None without one."""
    prepare = getattr(built.sweep.evaluator, "prepare_teacher", None)
    if prepare is None:
        return None
    try:
        info = prepare(cache_root / "teachers", progress=lambda line: print(line, flush=True))
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if info is None:
        return None
    print(f"[hwnas] distillation teacher: {info['path']} (sha256 {info['sha256'][:12]})")
    return dict(info)


def _data_os_error(exc: OSError, cfg: DictConfig) -> str:
    """One line for an OSError while the data was read or its cache written, naming the key it comes from."""
    file = str(exc.filename) if exc.filename else ""
    source = cfg.dataset.get("path")
    reading = bool(source and file) and Path(file).resolve().is_relative_to(Path(str(source)).expanduser().resolve())
    if reading:
        key, allowed = "dataset.path", "files this user can read"
    elif cfg.dataset.get("cache_dir"):
        key, allowed = "dataset.cache_dir", "a folder this user can write, or null (the run folder)"
    else:
        key, allowed = "dataset", "a readable data source and a writable run_dir (or dataset.cache_dir)"
    return f"{key}: {type(exc).__name__}: {exc.strerror or exc}{f' ({file!r})' if file else ''}; allowed: {allowed}"


def describe_hardware(h: dict[str, Any]) -> str:
    """One line: where latencies come from, on which device, with which protocol."""
    fp = h.get("fingerprint") or {}
    device = f"{fp.get('cpu_model') or 'device'}{' / ' + fp['gpu']['name'] if fp.get('gpu') else ''} (id {h['device_id']})"
    where = f"{len(h['urls'])} agent(s)" if h.get("urls") else "this machine"
    p = h["protocol"]
    how = (f"{p['blocks']} blocks of >= {p['block_s'] * 1000:g} ms, {p['threads']} thread(s), batch {p['batch_size']}, "
           f"repeated while CV > {p['cv_threshold']:g}")
    predictor = h.get("predictor")
    source = f"measured on {where}"
    if predictor:
        e = predictor["error"]
        figures = f"{e['within10']:.0%} within +-10%, MAPE {e['mape']:.1f}%, rank {e['spearman']:.2f}, n={e['n_fit']}"
        source = (f"predicted ({figures}); candidates predicted over budget skipped, others {source}"
                  if h.get("prescreen") else f"predicted for device {predictor['device_id']} ({figures})")
    cache = f"; cache {h['cache']}" if h.get("cache") else ""
    return f"{h['target']} {source}: {device}; {how}; isolation: {h['isolation']}{cache}"


def describe_data(summary: dict[str, Any]) -> str:
    sizes = summary["splits"]
    cache = summary["cache"]
    made = "reused" if cache["reused"] else f"decoded in {cache['decode_s']:.1f} s"
    source = " ".join(str(part) for part in (summary["kind"], summary.get("path") or summary.get("module")) if part)
    return (
        f"{source} - {sum(sizes.values())} items (train {sizes['train']}, val {sizes['val']}, "
        f"test {sizes['test']}), {len(summary['classes'])} classes, input {'x'.join(map(str, summary['input_shape']))}, "
        f"fingerprint {summary['fingerprint']}; cache {made} ({cache['path']})"
    )


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
