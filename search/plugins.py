"""Which `_target_`s a config may name, checked as strings before anything is imported.

Hydra imports and calls whatever dotted name a `_target_` holds (`builtins.open`,
`pandas.read_pickle`, `torch.load`, ...), and only refuses a handful of names after the import. So
hwnas decides first, from the strings alone:

- hwnas' own classes for each config group: every `_target_` of the shipped `conf/<group>/*.yaml`
  files (read as YAML, nothing imported), plus a few public Optuna samplers for `search`;
- module prefixes the user trusts explicitly, `plugins=[mylab, otherlab.search]`, given on the
  current command line or in a config file of their own (`hwnas --config-dir DIR`). A target is a
  plug-in when it equals a prefix or starts with `prefix.`. A prefix may not be a standard-library
  module, hwnas, or a library hwnas depends on: those are never plug-ins.

A run folder's `config.yaml` is not the user's own: its `plugins` key is ignored (see
`hwnas.search.run_folder`). After an object is built, `check_interface` checks its type against
its group's interface. This module imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Config groups whose node hwnas instantiates (hydra.utils.instantiate) or imports (check_target_kwargs).
TARGET_GROUPS = ("dataset", "space", "search", "evaluator", "hardware", "runner", "scheduler")

# Public Optuna samplers that work on hwnas' define-by-run spaces, besides the shipped conf/search files.
OPTUNA_SAMPLERS = (
    "optuna.samplers.TPESampler",
    "optuna.samplers.NSGAIISampler",
    "optuna.samplers.NSGAIIISampler",
    "optuna.samplers.GPSampler",
    "optuna.samplers.RandomSampler",
    "optuna.samplers.CmaEsSampler",
    "optuna.samplers.QMCSampler",
)

# Modules that are never plug-ins (besides the standard library): hwnas and what it is built on.
# The installed dependency tree of hwnas is added to this at run time (`_dependency_modules`).
NEVER_PLUGINS = frozenset({
    "hwnas", "__main__", "__future__", "builtins", "torch", "torchvision", "pytorch_lightning", "lightning",
    "lightning_fabric", "lightning_utilities", "torch_pruning", "optuna", "ray", "hydra", "omegaconf", "antlr4",
    "numpy", "pandas", "pyarrow", "mlflow", "onnx", "onnxruntime", "onnxconverter_common", "sklearn", "scipy",
    "joblib", "matplotlib", "yaml", "cloudpickle", "dill", "setuptools", "pkg_resources", "_distutils_hack",
    "pip", "distutils", "imp", "site", "IPython",
})

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
PLUGINS_HINT = "a module named in plugins=[...]"


class PluginError(ValueError):
    """A target or a plug-in prefix that is not allowed: one line naming the key and the value."""


def conf_dir() -> Path:
    return Path(str(importlib.resources.files("hwnas.conf")))


# --- hwnas' own targets -----------------------------------------------------------------------------


def iter_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every `_target_` in a plain tree of dicts and lists, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            else:
                yield from iter_targets(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from iter_targets(value, f"{path}[{i}]")


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


@functools.cache
def shipped_targets() -> dict[str, frozenset[str]]:
    """group -> every `_target_` the shipped conf/<group>/*.yaml files (and experiment files) name."""
    root = conf_dir()
    out: dict[str, set[str]] = {g: set() for g in TARGET_GROUPS}
    out["search"].update(OPTUNA_SAMPLERS)
    for group in TARGET_GROUPS:
        for path in sorted((root / group).glob("*.yaml")):
            # `???` (a target the user must give, e.g. dataset=lightning's module) allows nothing.
            out[group].update(str(t) for _, t in iter_targets(_load_yaml(path)) if t != "???")
    for path in sorted((root / "experiment").glob("*.yaml")):
        for where, target in iter_targets(_load_yaml(path)):
            group = where.split(".", 1)[0].split("[", 1)[0]
            if group in out:
                out[group].add(str(target))
    return {g: frozenset(t) for g, t in out.items()}


# --- the user's plug-ins ----------------------------------------------------------------------------


@functools.cache
def _dependency_modules() -> frozenset[str]:
    """Top-level modules of every installed distribution hwnas depends on, directly or not."""
    try:
        from importlib.metadata import PackageNotFoundError, packages_distributions, requires
    except ImportError:  # pragma: no cover
        return frozenset()
    seen: set[str] = set()
    todo = ["hwnas"]
    while todo:
        dist = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = requires(dist) or []
        except PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            name = re.match(r"[A-Za-z0-9_.\-]+", req)
            if name:
                todo.append(name.group(0))
    modules = set()
    for module, dists in packages_distributions().items():
        if any(re.sub(r"[-_.]+", "-", d).lower() in seen for d in dists):
            modules.add(module)
    return frozenset(modules)


def never_plugin(prefix: str) -> bool:
    top = prefix.split(".", 1)[0]
    return top in sys.stdlib_module_names or top in NEVER_PLUGINS or top in _dependency_modules()


def check_plugins(plugins: Any, key: str = "plugins") -> tuple[str, ...]:
    """The trusted prefixes as a tuple; PluginError (one line) for anything that is not a plug-in module."""
    if plugins is None:
        return ()
    if isinstance(plugins, str) or not isinstance(plugins, (list, tuple)):
        raise PluginError(f"{key}: {plugins!r} is not a list; allowed: a list of module prefixes, e.g. plugins=[mylab]")
    for i, prefix in enumerate(plugins):
        if not isinstance(prefix, str) or not _DOTTED.fullmatch(prefix):
            raise PluginError(f"{key}[{i}]: {prefix!r} is not a module name; allowed: a dotted Python name such as mylab or mylab.search")
        if never_plugin(prefix):
            raise PluginError(
                f"{key}[{i}]: {prefix!r} is the standard library, hwnas or a library hwnas depends on; "
                "allowed: a module of your own (e.g. mylab); hwnas' own classes need no plug-in"
            )
    return tuple(plugins)


# --- checking targets -------------------------------------------------------------------------------


def target_allowed(target: Any, group: str | None, plugins: Sequence[str]) -> bool:
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        return False
    if group is not None and target in shipped_targets().get(group, ()):
        return True
    return any(target == p or target.startswith(p + ".") for p in plugins)


def refusal(key: str, target: Any, group: str | None, where: str = "", run_folder: bool = False) -> str:
    own = sorted(shipped_targets().get(group, ())) if group else []
    hint = PLUGINS_HINT + (" on this command line (a run folder cannot widen the list)" if run_folder else "")
    allowed = f"hwnas' own {group} classes ({', '.join(own)}) or {hint}" if own else hint
    return f"{key}: {target!r}{where} is not allowed; allowed: {allowed}"


def check_target(key: str, target: Any, plugins: Sequence[str], where: str = "", run_folder: bool = False) -> None:
    """PluginError unless `target` (at config key `key`, e.g. `search._target_`) may be imported."""
    top = key.split(".", 1)[0].split("[", 1)[0]
    group = top if top in TARGET_GROUPS else None
    if not target_allowed(target, group, plugins):
        raise PluginError(refusal(key, target, group, where, run_folder))


def check_tree(tree: Any, plugins: Sequence[str], where: str = "", run_folder: bool = False) -> None:
    """Every `_target_` in a whole config tree (a plain container), and no `hydra` node."""
    if isinstance(tree, dict) and "hydra" in tree:
        raise PluginError(f"hydra{where}: a hydra node is not allowed; allowed: hwnas' own settings (your config files go in --config-dir DIR)")
    for key, target in iter_targets(tree):
        check_target(key, target, plugins, where, run_folder)


def hydra_override(item: str) -> bool:
    """An override that sets Hydra's own config (hydra.searchpath=..., hydra/launcher=...)."""
    key = item.lstrip("+~").split("=", 1)[0]
    return re.match(r"hydra([./@]|$)", key) is not None


# --- after instantiation ----------------------------------------------------------------------------


def _protocol_members(proto: type) -> set[str]:
    members: set[str] = set()
    for base in proto.__mro__:
        if base in (object,) or base.__name__ in ("Protocol", "Generic"):
            continue
        names = set(vars(base)) | set(getattr(base, "__annotations__", {}))
        members.update(n for n in names if not n.startswith("_"))
    return members


def conforms(obj: Any, interface: type) -> bool:
    """isinstance for classes; for a Protocol, every member present (looked up statically, so no
    property runs and no runtime_checkable decorator is needed)."""
    if not getattr(interface, "_is_protocol", False):
        return isinstance(obj, interface)
    for name in _protocol_members(interface):
        try:
            value = inspect.getattr_static(obj, name)
        except AttributeError:
            return False
        if callable(getattr(interface, name, None)) and not isinstance(value, property) and not callable(value):
            if not isinstance(value, (staticmethod, classmethod)):
                return False
    return True


def interface_of(group: str) -> tuple[type, str] | None:
    """The type a group's object must have, and how to name it."""
    if group == "dataset":
        from hwnas.evaluators.data import DataRecipe

        return DataRecipe, "a data recipe (hwnas.evaluators.data.DataRecipe)"
    if group == "space":
        from hwnas.spaces.base import SearchSpace

        return SearchSpace, "a SearchSpace (hwnas.spaces.base)"
    if group == "search":
        import optuna

        return optuna.samplers.BaseSampler, "an optuna BaseSampler"
    if group == "evaluator":
        from hwnas.evaluators.base import Evaluator

        return Evaluator, "an Evaluator (hwnas.evaluators.base)"
    if group == "hardware":
        from hwnas.evaluators.measure.base import Target

        return Target, "a latency Target (hwnas.evaluators.measure.base)"
    if group == "runner":
        from hwnas.search.runners.base import Runner

        return Runner, "a Runner (hwnas.search.runners.base)"
    if group == "scheduler":
        from hwnas.search.schedulers.base import Scheduler

        return Scheduler, "a Scheduler (hwnas.search.schedulers.base)"
    return None


def check_interface(group: str, obj: Any, target: str) -> None:
    """PluginError unless the object a group's `_target_` built has the group's interface."""
    found = interface_of(group)
    if found is None:
        return
    interface, name = found
    if not conforms(obj, interface):
        raise PluginError(f"{group}: {target} built a {type(obj).__name__}, not {name}")
