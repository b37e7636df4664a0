"""Compose the Hydra config from conf/ and command-line overrides, and validate all of it up front.

Everything a run needs is checked here, before Ray or MLflow start: unknown keys, wrong types,
out-of-range values, unknown group choices. Every problem is raised as one `ConfigError` line that
names the key, the bad value and what is allowed; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import importlib.resources
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hwnas.evaluators.measure.base import PLAN_KEYS  # conf/hardware keys that are not the target's own

# The config tree ships inside the package (hwnas.conf): the same files for an editable checkout and a wheel.
CONF_DIR = Path(str(importlib.resources.files("hwnas.conf")))
GROUPS = ("dataset", "space", "search", "objective", "evaluator", "hardware", "runner", "scheduler", "tracking", "select")
TOP_LEVEL = {"experiment_name", "n_trials", "seed", "run_dir", "resume", "plugins", "warm_start", "compression", *GROUPS}
MODES = ("max", "min")


class ConfigError(ValueError):
    """A bad config value: one line, naming the key, the value and what is allowed."""


def group_choices(group: str, config_dir: Path | None = None) -> list[str]:
    """The shipped choices of a group, plus those in the user's own --config-dir."""
    dirs = [CONF_DIR] if config_dir is None else [CONF_DIR, config_dir]
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def split_config_dir(args: Sequence[str]) -> tuple[Path | None, list[str]]:
    """(`--config-dir DIR` or `--config-dir=DIR`, the other arguments): a folder of the user's own config files."""
    rest: list[str] = []
    found: list[str] = []
    items = iter(args)
    for item in items:
        if item == "--config-dir":
            found.append(next(items, ""))
        elif item.startswith("--config-dir="):
            found.append(item.split("=", 1)[1])
        else:
            rest.append(item)
    if not found:
        return None, rest
    if len(found) > 1 or not found[0] or not Path(found[0]).is_dir():
        raise ConfigError(f"--config-dir: {found[-1]!r} is not allowed; allowed: one existing folder of your own config files")
    return Path(found[0]).resolve(), rest


def _check_user_config_dir(config_dir: Path) -> None:
    # The user's own files may pick targets and plugins=[...]; Hydra's own settings stay hwnas'.
    from hwnas.search.plugins import PluginError, check_tree

    for path in sorted(config_dir.rglob("*.yaml")):
        try:
            tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as exc:
            raise ConfigError(f"--config-dir: {path} cannot be read ({type(exc).__name__}); allowed: YAML config files") from None
        if isinstance(tree, dict) and "hydra" in tree:
            try:
                check_tree({"hydra": None}, (), where=f" (in {path})")
            except PluginError as exc:
                raise ConfigError(str(exc)) from None


def compose_config(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides; Hydra's errors become ConfigError.

    `--config-dir DIR` among the overrides adds the user's own config files after the shipped ones.
    """
    from hwnas.search.plugins import hydra_override

    config_dir, overrides = split_config_dir(overrides)
    for item in overrides:
        if hydra_override(item):
            key = item.lstrip("+~").split("=", 1)[0]
            raise ConfigError(f"{key}: {item!r} is not allowed; allowed: hwnas' own Hydra settings (put your config files in --config-dir DIR)")
    _check_group_overrides(overrides, config_dir)
    searchpath = []
    if config_dir is not None:
        _check_user_config_dir(config_dir)
        searchpath = [f"hydra.searchpath=[{config_dir.as_uri()}]"]
    try:
        return _compose(config_name, [*overrides, *searchpath])
    except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError) as exc:
        # Some Hydra errors (a key under a list, `+key` that exists) name no override: find the one.
        message = _hydra_message(exc)
        if not _names_an_override(message, overrides):
            message = _culprit_message(overrides, config_name, message, searchpath)
        raise ConfigError(message) from None


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's compose over the shipped conf/, with no global Hydra state left behind."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _names_an_override(message: str, overrides: Sequence[str]) -> bool:
    return any(message.startswith(item.lstrip("+~").split("=", 1)[0]) for item in overrides)


def _culprit_message(overrides: Sequence[str], config_name: str, fallback: str, searchpath: Sequence[str]) -> str:
    """Compose with one override at a time (and the user's --config-dir, as the run would); name the
    first that fails on its own, with Hydra's reason."""
    for item in overrides:
        try:
            _compose(config_name, [item, *searchpath])
        except Exception as exc:  # noqa: BLE001 - any failure of this override alone names it
            key = item.lstrip("+~").split("=", 1)[0] or item
            reason = _hydra_message(exc).replace("\n", " ")
            if _names_an_override(reason, [item]):
                return reason
            return f"{key}: {item!r} cannot be applied ({reason}); allowed: key=VALUE for a key in hwnas --cfg, +key=VALUE for a new one, ~key to delete"
    return f"overrides: {fallback}; allowed: key=VALUE for a key in hwnas --cfg"


def _check_group_overrides(overrides: Sequence[str], config_dir: Path | None = None) -> None:
    # Hydra's own message for an unknown group option is many lines; give one that lists the options.
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if sep and (group in GROUPS or group == "experiment"):
            choices = group_choices(group, config_dir)
            if value not in choices and not (group == "experiment" and value == "null"):
                raise ConfigError(f"{group}={value}: unknown choice; allowed: {', '.join(choices)}")


def _hydra_message(exc: Exception) -> str:
    text = str(exc).strip()
    key = _override_key(text)
    if key is not None:
        group = key.rsplit(".", 1)[0] if "." in key else None
        where = f"the keys of conf/{group}/" if group in GROUPS else ", ".join(sorted(TOP_LEVEL))
        # Hydra says the same of a key that does not exist and of a mapping given keys it does not have
        # (objective.budgets={model_bytes: 1}); its '+' form is what both need.
        add = text.split("To append to your config use ", 1)[1].split()[0] if "To append to your config use " in text else None
        hint = f"; to add keys: {add}" if add else ""
        return f"{key}: unknown key, or a mapping given keys it does not have; allowed: {where}{hint} (hwnas --cfg shows the composed config)"
    if text.startswith("Error merging override "):
        item = text.splitlines()[0][len("Error merging override "):].strip()
        key, _, value = item.lstrip("+~").partition("=")
        cause = str(exc.__cause__ or "")
        kind = "list" if "object_type=list" in cause else "mapping" if "object_type=dict" in cause else "value of the same kind"
        return f"{key}: {value!r} does not fit there; allowed: a {kind}, as in conf/ (hwnas --cfg shows the composed config)"
    return text.splitlines()[0] if text else type(exc).__name__


def _override_key(text: str) -> str | None:
    if "Could not override '" in text:
        return text.split("Could not override '")[1].split("'")[0]
    return None


# --- validation -------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raise ConfigError with one line on the first problem."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config could not be resolved: {str(exc).splitlines()[0]}") from None
    plugins = check_imports(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required (??? in conf/) but not set; allowed: give it as {missing[0]}=VALUE")
    unknown = {str(k) for k in cfg.keys()} - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown top-level key; allowed: {', '.join(sorted(TOP_LEVEL))}")
    try:
        _check_values(cfg, plugins)
    except ValueError as exc:  # checks.ValueProblem: already one line naming key, value, what is allowed
        raise ConfigError(str(exc)) from None


def _check_values(cfg: DictConfig, plugins: Sequence[str]) -> None:
    from hwnas.search import checks

    for key in sorted({"experiment_name", "n_trials", "seed", "run_dir", "resume", *GROUPS} - {str(k) for k in cfg.keys()}):
        if key in GROUPS:
            raise ConfigError(f"{key}: missing (removed with ~{key}?); allowed: {key}=CHOICE, one of {', '.join(group_choices(key))}")
        raise ConfigError(f"{key}: missing; allowed: give it as {key}=VALUE")
    for group in GROUPS:
        if not isinstance(cfg[group], DictConfig):
            raise checks.refuse(group, cfg[group], f"{group}=CHOICE, one of {', '.join(group_choices(group))}", "is not a config group;")
    checks.check_finite(cfg)
    checks.integer(1, checks.MAX_TRIALS)("n_trials", cfg.n_trials)
    checks.integer(0, checks.MAX_SEED)("seed", cfg.seed)
    checks.boolean("resume", cfg.resume)
    checks.check_name("experiment_name", cfg.experiment_name)
    checks.check_run_dir(cfg.run_dir)
    _check_objective(cfg.objective)
    _check_keys(cfg.tracking, "tracking", {"enabled", "uri", "experiment", "registered_model", "connect_timeout_s"}, optional={"connect_timeout_s"})
    checks.boolean("tracking.enabled", cfg.tracking.enabled)
    checks.check_name("tracking.experiment", cfg.tracking.experiment)
    checks.check_name("tracking.registered_model", cfg.tracking.registered_model)
    checks.CONNECT_TIMEOUT("tracking.connect_timeout_s", cfg.tracking.get("connect_timeout_s", 15))
    checks.check_tracking_uri(cfg.tracking.uri, enabled=cfg.tracking.enabled)
    _check_keys(cfg.select, "select", {"rule"})
    from hwnas.search.selection import RULES

    _choice(cfg.select, "rule", RULES, "select")
    for group in ("dataset", "space", "search", "evaluator", "hardware", "runner", "scheduler"):
        check_target_kwargs(cfg[group], group, plugins)
        checks.check_group(cfg[group], group)
    from hwnas.evaluators.compression_options import from_config as compression_settings

    compression_settings(cfg.get("compression"))  # one line naming the key on a bad value
    from hwnas.search.warm_start import check_warm_start

    check_warm_start(cfg, plugins)  # an earlier sweep of the same space, read as untrusted input


def _check_objective(obj: DictConfig) -> None:
    _check_keys(obj, "objective", {"metrics", "latency_budget_ms", "budgets"})
    metrics = obj.metrics
    if not isinstance(metrics, ListConfig) or len(metrics) == 0:
        raise ConfigError(f"objective.metrics: {metrics!r} is not a list of {{name, mode}}; give at least one")
    names = []
    for i, m in enumerate(metrics):
        where = f"objective.metrics[{i}]"
        if not isinstance(m, DictConfig) or set(m.keys()) != {"name", "mode"}:
            raise ConfigError(f"{where}: {m!r}; allowed: a mapping with exactly the keys name and mode")
        if m.mode not in MODES:
            raise ConfigError(f"{where}.mode: {m.mode!r} is not a direction; allowed: max, min")
        if not isinstance(m.name, str) or not m.name.strip():
            raise ConfigError(f"{where}.name: {m.name!r} is not allowed; allowed: the name of a metric the evaluator reports")
        names.append(m.name)
    if len(set(names)) != len(names):
        raise ConfigError(f"objective.metrics: {names} names a metric twice; allowed: each metric once")
    budget = obj.latency_budget_ms
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0):
        raise ConfigError(f"objective.latency_budget_ms: {budget!r} is not allowed; allowed: a number > 0, or null")
    if not isinstance(obj.budgets, DictConfig):
        raise ConfigError(f"objective.budgets: {obj.budgets!r}; allowed: a mapping metric -> bound")
    for key, bound in obj.budgets.items():
        if not isinstance(bound, (int, float)) or isinstance(bound, bool):
            raise ConfigError(f"objective.budgets.{key!s}: {bound!r} is not a number; allowed: a number")


def check_imports(cfg: DictConfig) -> tuple[str, ...]:
    """Before anything is imported: `plugins` is a list of the user's own modules, and every `_target_`
    in the whole tree is one of hwnas' own for its group or under one of those modules. Returns them."""
    from hwnas.search.plugins import PluginError, check_plugins, check_tree

    try:
        given = cfg.get("plugins")
        plugins = check_plugins(OmegaConf.to_container(given) if isinstance(given, (DictConfig, ListConfig)) else given)
        check_tree(OmegaConf.to_container(cfg, resolve=True), plugins)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None
    return plugins


def _import_object(dotted: str) -> Any:
    """The object a dotted name names: the longest importable module prefix, then attributes.
    (Hydra's get_object does the same but logs a multi-line report of its own on failure.)"""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not ".".join(parts[:i]).startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"No module named {parts[0]!r}")


def check_target_kwargs(node: DictConfig, group: str, plugins: Sequence[str] = ()) -> None:
    """A `_target_` group: the target must be allowed (hwnas.search.plugins) and import, and every key
    must be one of its keyword arguments."""
    from hwnas.search.plugins import PluginError, check_target

    if "_target_" not in node:
        raise ConfigError(f"{group}: no _target_; allowed: a mapping with _target_ naming a class")
    try:
        check_target(f"{group}._target_", node._target_, plugins)  # nothing is imported for a refused name
    except PluginError as exc:
        raise ConfigError(str(exc)) from None
    try:
        target = _import_object(node._target_)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{group}._target_: {node._target_!r} cannot be imported ({reason})") from None
    allowed = accepted_keys(target)
    if allowed is None:
        return
    for key in node.keys():
        if key in ("_target_", "_partial_", "_convert_", "_recursive_"):
            continue
        if group == "hardware" and key in PLAN_KEYS:  # how latencies are obtained, not the target's own
            continue
        if key in COMPLETED_KEYS.get(group, ()):
            raise ConfigError(f"{group}.{key!s}: set by hwnas ({COMPLETED_KEYS[group][str(key)]}); allowed: leave it out")
        if key not in allowed:
            raise ConfigError(f"{group}.{key!s}: unknown key for {node._target_}; allowed: "
                              f"{', '.join(sorted(allowed - set(COMPLETED_KEYS.get(group, ()))))}")


# Arguments hwnas passes when it builds a group's object: a config that sets them would be overridden silently.
COMPLETED_KEYS: dict[str, dict[str, str]] = {
    "scheduler": {"directions": "the modes of objective.metrics"},
}


def accepted_keys(target: Any) -> set[str] | None:
    """The keyword arguments `target` takes; a class's `**kwargs` passed up to its base's __init__
    (the datasets' shared options) are followed. None when some callable takes any keyword."""
    functions = [vars(c)["__init__"] for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    keys: set[str] = set()
    for function in functions:
        params = inspect.signature(function).parameters
        keys |= {k for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return keys
    return None


def _check_keys(node: DictConfig, where: str, allowed: set[str], optional: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    extra = {str(k) for k in node.keys()} - allowed
    if extra:
        raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown key; allowed: {', '.join(sorted(allowed))}")
    missing = allowed - optional - {str(k) for k in node.keys()}
    if missing:
        raise ConfigError(f"{where}.{sorted(missing)[0]}: missing; it must be set")


def _type(node: DictConfig, key: str, typ: type, prefix: str = "") -> Any:
    value = node[key]
    name = f"{prefix}.{key}" if prefix else key
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: a {typ.__name__}")
    return value


def _int(node: DictConfig, key: str, lo: int, prefix: str = "") -> int:
    value = node[key]
    name = f"{prefix}.{key}" if prefix else key
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: an integer >= {lo}")
    return value


def _choice(node: DictConfig, key: str, allowed: Sequence[str], prefix: str) -> str:
    value = node[key]
    if value not in allowed:
        raise ConfigError(f"{prefix}.{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def to_container(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
