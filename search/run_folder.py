"""A run folder is untrusted input: someone else may have written it (a colleague's shared sweep).

`hwnas-export`, `hwnas-sync` and `resume=true` read a run folder's `config.yaml`, `trials.jsonl`
and `mlflow_pending.jsonl`. Before anything builds, copies or uploads from them:

- `config.yaml` holds no `${...}` interpolation (hwnas writes it resolved), its `plugins` key is
  replaced by the current command line's, and every `_target_` in it must be hwnas' own or under
  one of those plug-ins (hwnas.search.plugins): a run folder can never widen the list itself;
- every file a record names (a trial's `artifact`, the paths a pending MLflow operation uploads)
  resolves inside the run folder, or inside the sweep's `runner.storage` trials folder;
- a pending MLflow operation is one of the tracking store's own operations.

Every refusal is a one-line ConfigError naming the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hwnas.search.config import ConfigError
from hwnas.search.plugins import PluginError, check_plugins, check_tree

# The MLflow operations a pending file may replay (hwnas.search.tracking.MlflowStore.op_*).
PENDING_OPS = frozenset({
    "op_trial_started", "op_trial_ended", "op_tag_trial", "op_end_run", "op_set_running",
    "op_sweep_outputs", "op_register", "op_log_export", "op_log_dataset",
})
PENDING_FILE = "mlflow_pending.jsonl"  # hwnas.search.tracking.PENDING_FILE: named again so this check imports no MLflow


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}" if path else str(k)
            yield where, str(k)
            yield from _strings(v, where)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def load_run_config(path: Path, plugins: Sequence[str] = ()) -> DictConfig:
    """A run folder's config.yaml, checked; `plugins` are the current command line's (the file's own are ignored)."""
    try:
        loaded = OmegaConf.load(path)  # YAML safe loading: no tags that construct objects
    except Exception as exc:
        raise ConfigError(f"run_dir: {str(path)!r} cannot be read ({type(exc).__name__}); allowed: the config.yaml hwnas wrote") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"run_dir: {str(path)!r} is not a config mapping; allowed: the config.yaml hwnas wrote")
    tree = OmegaConf.to_container(loaded, resolve=False)
    for key, text in _strings(tree):
        if "${" in text:
            raise ConfigError(f"{key}: {text!r} in {path} is an interpolation; allowed: the resolved config.yaml hwnas writes")
    assert isinstance(tree, dict)
    try:
        trusted = check_plugins(list(plugins))
        tree["plugins"] = list(trusted)
        check_tree(tree, trusted, where=f" (in {path})", run_folder=True)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None
    loaded.plugins = list(trusted)
    return loaded


def artifact_roots(run_dir: Path, cfg: DictConfig) -> list[Path]:
    """Where a sweep's files may lie: its run folder, and `<runner.storage>/<run folder name>/trials`."""
    roots = [run_dir.resolve()]
    storage = OmegaConf.select(cfg, "runner.storage", default=None)
    if isinstance(storage, str) and storage:
        roots.append(Path(storage).resolve() / run_dir.resolve().name / "trials")
    return roots


def check_inside(path: Any, roots: Sequence[Path], what: str) -> None:
    """ConfigError unless `path` (a record's file) resolves inside one of `roots`; a relative path is
    relative to the run folder (roots[0]), as trials.jsonl keeps it."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what}: {path!r} is not a file path; allowed: a file inside {roots[0]}")
    resolved = (roots[0] / path).resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise ConfigError(f"{what}: {path} is outside the run folder; allowed: a file inside {' or '.join(map(str, roots))}")


def check_artifacts(run_dir: Path, cfg: DictConfig, rows: list[dict[str, Any]]) -> None:
    """Every trial's `artifact` in trials.jsonl lies inside the run folder (or the storage trials folder)."""
    roots = artifact_roots(run_dir, cfg)
    for row in rows:
        artifact = row.get("artifact") if isinstance(row, dict) else None
        if artifact:
            check_inside(artifact, roots, f"{run_dir / 'trials.jsonl'}: trial {row.get('number')!r} artifact")


def check_pending(run_dir: Path, cfg: DictConfig) -> None:
    """Every operation waiting in mlflow_pending.jsonl is a tracking operation on files of this run."""
    pending = run_dir / PENDING_FILE
    if not pending.is_file():
        return
    roots = artifact_roots(run_dir, cfg)
    for i, line in enumerate(pending.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{pending}: line {i}"
        try:
            op = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{where} is not JSON; allowed: the operations hwnas wrote") from None
        if not isinstance(op, dict) or op.get("op") not in PENDING_OPS:
            name = op.get("op") if isinstance(op, dict) else op
            raise ConfigError(f"{where}: op {name!r} is not allowed; allowed: {', '.join(sorted(PENDING_OPS))}")
        if op.get("artifact"):
            check_inside(op["artifact"], roots, f"{where} artifact")
        for p in op.get("paths") or []:
            check_inside(p, roots, f"{where} path")
        if op.get("op") == "op_log_export":  # the folder it uploads
            check_inside(op.get("export_dir"), roots, f"{where} export_dir")


def check_run_folder(run_dir: Path, cfg: DictConfig, rows: list[dict[str, Any]] | None = None) -> None:
    """The records of a run folder name only its own files (artifacts, pending uploads)."""
    if rows is None:
        from hwnas.search.trial_log import TrialLog

        rows = TrialLog(run_dir).rows()
    check_artifacts(run_dir, cfg, rows)
    check_pending(run_dir, cfg)
