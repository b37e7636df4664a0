"""Value checks for every leaf of the composed config, run by `config.validate` before anything starts.

What is checked here needs no network and writes nothing:

- every float anywhere in the tree is finite (`nan`, `inf` are refused, naming the dotted key);
- every key of every shipped group has a type and a range (`SCHEMA`, keyed by the group's
  `_target_`); a group whose target is not listed is left to its constructor;
- names that become paths or MLflow names (`experiment_name`, `tracking.experiment`,
  `tracking.registered_model`) use a safe character set, so the default run_dir
  (`results/${experiment_name}/...`) never leaves results/;
- paths (`run_dir`, `runner.storage`, the file of an `sqlite:///` tracking URI) can be written
  where they say, without creating anything to find out;
- `tracking.uri` and `runner.address` have an allowed form (whether they answer is `reach.py`'s).

Each problem is one ValueError/ConfigError line: the key, the value, what is allowed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, ListConfig, OmegaConf

from hwnas.evaluators.measure.base import AGENT_URL_RE, ENV_NAME_RE

# Bounds. A bound is there to catch a typo (an extra zero, a unit mix-up) before hours are spent:
# each is far above any sensible value, and below the point where something overflows or the run
# could never finish.
MAX_TRIALS = 1_000_000      # a table benchmark runs ~10^4 look-ups; 10^6 trials is days of journal and JSONL
MAX_SEED = 2**32 - 1        # numpy's legacy RandomState (Optuna's samplers) takes seeds < 2**32
MAX_COUNT = 1_000_000       # epochs, warm-up and timed runs, retries, samples
MAX_WORKERS = 100_000       # concurrent trials, CPUs/GPUs per trial, threads
MAX_TIMEOUT_S = 3600.0      # connect timeouts: an hour is already far too long to wait for an answer
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_ALLOWED = "1-100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
SQLITE_HEADER = b"SQLite format 3\x00"
# MLflow database stores beside SQLite: accepted only where their driver is installed here.
DB_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("pymysql", "MySQLdb"), "mssql": ("pyodbc",)}
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class ValueProblem(ValueError):
    """One bad value; `config.validate` turns it into a ConfigError."""


def show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(key: str, value: Any, allowed: str, what: str = "is not allowed") -> ValueProblem:
    return ValueProblem(f"{key}: {show(value)} {what.rstrip('; ')}; allowed: {allowed}")


# --- the whole tree: finite numbers -----------------------------------------------------------------


def check_finite(node: Any, prefix: str = "") -> None:
    """Every float leaf of the tree is finite; the first that is not is named by its dotted key."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            check_finite(node[key], f"{prefix}{key!s}.")
        return
    if isinstance(node, ListConfig):
        base = prefix[:-1]
        for i, item in enumerate(node):
            check_finite(item, f"{base}[{i}].")
        return
    if isinstance(node, float) and not math.isfinite(node):
        raise refuse(prefix[:-1], node, "a finite number", "is not a finite number")


# --- leaf checkers: (key, value) -> None or raise ---------------------------------------------------

Check = Callable[[str, Any], None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int, null: bool = False) -> Check:
    allowed = f"an integer {lo}..{hi}" + (", or null" if null else "")

    def check(key: str, v: Any) -> None:
        if v is None and null:
            return
        if not _is_int(v) or not lo <= v <= hi:
            raise refuse(key, v, allowed)

    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           null: bool = False) -> Check:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    allowed = "a finite number" + (" " + " and ".join(parts) if parts else "") + (", or null" if null else "")

    def check(key: str, v: Any) -> None:
        if v is None and null:
            return
        ok = _is_num(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise refuse(key, v, allowed)

    return check


def boolean(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise refuse(key, v, "true or false")


def one_of(*choices: Any) -> Check:
    allowed = ", ".join(map(str, choices))

    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or isinstance(v, (DictConfig, ListConfig)) or v not in choices:
            raise refuse(key, v, allowed)

    return check


def text(key: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip() or any(ord(c) < 32 for c in v):
        raise refuse(key, v, "a non-empty string without control characters")


def choices(item: Check, what: str) -> Check:
    """A non-empty list, each member once and each allowed by `item`."""

    def check(key: str, v: Any) -> None:
        if not isinstance(v, ListConfig):
            raise refuse(key, v, f"a non-empty list of {what}", "is not a list")
        if len(v) == 0:
            raise refuse(key, v, f"a non-empty list of {what}", "is empty")
        seen: list[Any] = []
        for i, member in enumerate(v):
            item(f"{key}[{i}]", member)
            if member in seen:
                raise refuse(f"{key}[{i}]", member, f"each of {what} once", "is listed twice")
            seen.append(member)

    return check


def rung_list(key: str, v: Any) -> None:
    """scheduler.rungs: epochs, each an integer >= 1, strictly increasing."""
    allowed = "a non-empty list of epochs, integers >= 1, increasing (e.g. [1, 3])"
    if not isinstance(v, ListConfig) or len(v) == 0:
        raise refuse(key, v, allowed)
    for i, epoch in enumerate(v):
        if not _is_int(epoch) or epoch < 1 or (i and epoch <= v[i - 1]):
            raise refuse(f"{key}[{i}]", epoch, allowed)


def mapping(fields: Mapping[str, Check]) -> Check:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, DictConfig):
            raise refuse(key, v, f"a mapping with keys {', '.join(fields)}", "is not a mapping")
        for k in v.keys():
            if k not in fields:
                raise refuse(f"{key}.{k!s}", v[k], ", ".join(fields), "is an unknown key")
        for k, sub in fields.items():
            if k in v:
                sub(f"{key}.{k}", v[k])

    return check


def nullable(inner: Check) -> Check:
    def check(key: str, v: Any) -> None:
        if v is not None:
            inner(key, v)

    return check


# --- names and paths --------------------------------------------------------------------------------


def check_name(key: str, v: Any) -> None:
    """A name that becomes a folder or an MLflow name: a safe set, never a path."""
    if not isinstance(v, str) or not NAME_RE.fullmatch(v) or ".." in v:
        raise refuse(key, v, NAME_ALLOWED)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_writable_path(key: str, raw: str, path: Path, *, folder: bool) -> None:
    """`path` can be created (or, existing, used) without creating anything now: no regular file
    in the way, and the nearest existing parent a writable folder."""
    if path.exists():
        if folder and not path.is_dir():
            raise refuse(key, raw, "a folder (new or empty), not a file", "is an existing file")
        if not folder and path.is_dir():
            raise refuse(key, raw, "a file path, not a folder", "is an existing folder")
        return
    parent = _nearest_existing(path.parent if path.parent != path else path)
    if not parent.is_dir():
        raise refuse(key, raw, "a path whose parents are folders", f"sits under the file {str(parent)!r}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(key, raw, "a path under a folder you can write", f"would be created in {str(parent)!r}, which is not writable")


def _plain_path(key: str, v: Any, allowed: str) -> str:
    if not isinstance(v, str) or not v.strip() or any(ord(c) < 32 for c in v):
        raise refuse(key, v, allowed)
    return v


def check_run_dir(v: Any) -> None:
    """The sweep's own folder. Refused: empty, the current directory or one above it (a sweep's
    config.yaml, trials.jsonl, trials/ and export/ would mix with whatever is there, and the folder
    could never hold a second sweep), a file, a path under a file, an unwritable place."""
    raw = _plain_path("run_dir", v, "a folder path such as results/NAME")
    path = Path(os.path.abspath(raw))
    cwd = Path(os.path.abspath(os.getcwd()))
    holds_sweep = (path / "config.yaml").is_file()  # resume=true, hwnas-export, hwnas-sync in a run folder
    if (path == cwd or path in cwd.parents or path == Path(path.anchor)) and not holds_sweep:
        raise refuse("run_dir", raw, "a folder of its own below the current directory or elsewhere, e.g. results/NAME",
                     "is the current directory or above it (a sweep would write its files there)")
    check_writable_path("run_dir", raw, path, folder=True)


def check_storage(v: Any) -> None:
    if v is None:
        return
    raw = _plain_path("runner.storage", v, "a folder every node can read and write, or null")
    path = Path(os.path.abspath(raw))
    if path.exists() and not path.is_dir():
        raise refuse("runner.storage", raw, "a folder, not a file", "is an existing file")
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise refuse("runner.storage", raw, "a path whose parents are folders", f"sits under the file {str(parent)!r}")


# --- tracking.uri and runner.address ----------------------------------------------------------------


def tracking_schemes() -> list[str]:
    schemes = ["sqlite:///PATH", "http://HOST[:PORT]", "https://HOST[:PORT]"]
    for scheme, modules in DB_DRIVERS.items():
        if any(importlib.util.find_spec(m) is not None for m in modules):
            schemes.append(f"{scheme}://USER@HOST[:PORT]/DB")
    return schemes


def sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):].split("?", 1)[0]


def check_tracking_uri(v: Any, *, enabled: bool) -> None:
    """The form of tracking.uri always; when tracking is on, also that an SQLite file can be there."""
    key = "tracking.uri"
    allowed = ", ".join(tracking_schemes())
    if not isinstance(v, str) or not v.strip() or any(ord(c) <= 32 for c in v):
        raise refuse(key, v, allowed)
    if v.startswith("sqlite:"):
        if not v.startswith("sqlite:///") or not sqlite_path(v):
            raise refuse(key, v, "sqlite:///PATH (a file path after three slashes)", "is not an SQLite file URI;")
        if enabled:
            check_sqlite_file(v)
        return
    parts = urlsplit(v)
    scheme = parts.scheme.lower().split("+", 1)[0]
    try:
        port = parts.port
    except ValueError:
        raise refuse(key, v, "a port 1..65535", "has a bad port;") from None
    if scheme in ("http", "https"):
        if not parts.hostname or port == 0:
            raise refuse(key, v, allowed, "names no host;")
        return
    if scheme in DB_DRIVERS and any(s.startswith(scheme + "://") for s in tracking_schemes()):
        if not parts.hostname:
            raise refuse(key, v, allowed, "names no host;")
        return
    raise refuse(key, v, allowed)


def check_sqlite_file(uri: str) -> None:
    key = "tracking.uri"
    raw = sqlite_path(uri)
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    if path.exists():
        if path.is_dir():
            raise refuse(key, uri, "sqlite:///PATH of a database file", "names a folder;")
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise refuse(key, uri, "a database file you can read and write", f"cannot be read ({exc.strerror});") from None
        if head and head != SQLITE_HEADER:
            raise refuse(key, uri, "an SQLite database file, or a path where a new one can be made", "is not an SQLite database;")
        if not os.access(path, os.W_OK):
            raise refuse(key, uri, "a database file you can write", "is read-only;")
        return
    check_writable_path(key, uri, path, folder=False)


HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\]")
ADDRESS_ALLOWED = "null (a local Ray), auto, HOST:PORT or ray://HOST:PORT (PORT 1..65535)"


def parse_address(key: str, v: Any) -> tuple[str, str, int] | None:
    """runner.address -> (kind, host, port), kind 'gcs' or 'client'; None for null and auto."""
    if v is None or v == "auto":
        return None
    if not isinstance(v, str):
        raise refuse(key, v, ADDRESS_ALLOWED)
    kind, rest = ("client", v[len("ray://"):]) if v.startswith("ray://") else ("gcs", v)
    host, sep, port = rest.rpartition(":")
    if not sep or not HOST_RE.fullmatch(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise refuse(key, v, ADDRESS_ALLOWED)
    return kind, host.strip("[]"), int(port)


def address(key: str, v: Any) -> None:
    parse_address(key, v)


# --- the groups: one checker per key, by _target_ ----------------------------------------------------

SEED = integer(0, MAX_SEED)
SEED_OR_NULL = integer(0, MAX_SEED, null=True)
FRACTION = number(0, 1, lo_open=True, hi_open=True)
PRUNE_RATIOS = choices(number(0, 1, hi_open=True), "ratios 0 <= r < 1")
TIMEOUT = number(0, lo_open=True, null=True)
CONNECT_TIMEOUT = number(0, MAX_TIMEOUT_S, lo_open=True)


def _quant() -> Check:
    from hwnas.spaces.candidate import FORMATS

    return choices(one_of(*FORMATS), "formats " + ", ".join(FORMATS))


def _data(extra: Mapping[str, Check]) -> dict[str, Check]:
    return {
        "resolution": nullable(integer(8, 1024)),
        "channels": nullable(one_of(1, 3)),
        "val_fraction": FRACTION,
        "test_fraction": FRACTION,
        "batch_size": integer(1, 65536),
        "seed": SEED,
        "augment": boolean,
        "crop_padding": integer(0, 256),
        "hflip": boolean,
        "splits": nullable(text),
        "cache_dir": nullable(text),
        "fingerprint": nullable(text),
        **extra,
    }


def agent_urls(key: str, v: Any) -> None:
    allowed = "a non-empty list of agent URLs http(s)://HOST:PORT, each once"
    if not isinstance(v, ListConfig) or len(v) == 0:
        raise refuse(key, v, allowed)
    for i, url in enumerate(v):
        if not isinstance(url, str) or not AGENT_URL_RE.fullmatch(url):
            raise refuse(f"{key}[{i}]", url, allowed)
    if len({str(u).rstrip("/") for u in v}) != len(v):
        raise refuse(key, v, allowed, "lists a URL twice")


def env_name(key: str, v: Any) -> None:
    if not isinstance(v, str) or not ENV_NAME_RE.fullmatch(v):
        raise refuse(key, v, "the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*)")


def _path_or_null(key: str, v: Any) -> None:
    if v is not None:
        text(key, v)


# The latency target's timing settings (evaluators/measure), and the keys of conf/hardware that say how
# latencies are obtained (search/config.PLAN_KEYS).
TIMING: dict[str, Check] = {
    "name": text, "provider": one_of("cpu", "cuda"), "threads": integer(1, 1024), "batch_size": integer(1, 65536),
    "warmup": integer(0, 1_000_000), "repeats": integer(3, 100_000), "block_ms": number(0.01, 10_000),
    "cv_threshold": number(1e-4, 10), "max_rounds": integer(1, 100),
    "cache": _path_or_null, "predictor": _path_or_null, "prescreen": boolean,
}
LOCAL_TARGET: dict[str, Check] = {**TIMING, "isolate": boolean, "affinity": one_of("auto", "none")}


def _schema() -> dict[str, dict[str, Check]]:
    from hwnas.evaluators.training_options import ACCELERATORS, OPTIMIZERS
    from hwnas.search.samplers.rl_controller import REWARDS
    from hwnas.spaces.macro_cnn import BLOCK_KINDS, MAX_STAGES
    from hwnas.spaces.nb201 import OPS

    counts = integer(0, MAX_COUNT)
    return {
        "hwnas.evaluators.data.DigitsData": _data({}),
        "hwnas.evaluators.data.SyntheticData": _data({
            "n_samples": integer(20, 10_000_000), "num_classes": integer(2, 100_000), "noise": number(0, 1e6),
        }),
        "hwnas.evaluators.data.ImageFolderData": _data({
            "path": text, "resize": one_of("crop", "stretch"), "decode_workers": nullable(integer(1, 1024)),
        }),
        "hwnas.evaluators.data.NpzData": _data({"path": text}),
        "hwnas.evaluators.data.Cifar10Data": _data({"path": text}),
        "hwnas.evaluators.data.Cifar100Data": _data({"path": text, "label": one_of("fine", "coarse")}),
        "hwnas.evaluators.data.LightningData": _data({}),
        "hwnas.spaces.macro_cnn.MacroCNNSpace": {
            "n_stages": choices(integer(1, MAX_STAGES), f"integers 1..{MAX_STAGES}"),
            "depths": choices(integer(1, 64), "integers 1..64"),
            "widths": choices(integer(1, 4096), "integers 1..4096"),
            "kernels": choices(one_of(*range(1, 16, 2)), "odd integers 1..15"),
            "blocks": choices(one_of(*BLOCK_KINDS), "blocks " + ", ".join(BLOCK_KINDS)),
            "expansions": choices(integer(1, 16), "integers 1..16"),
            "stem_width": integer(1, 4096),
            "stem_stride": one_of(1, 2),
            "prune_ratios": PRUNE_RATIOS,
            "quant": _quant(),
        },
        "hwnas.spaces.nb201.NB201Space": {
            "ops": choices(one_of(*OPS), "ops " + ", ".join(OPS)),
            "C": integer(1, 1024),
            "N": integer(1, 64),
            "prune_ratios": PRUNE_RATIOS,
            "quant": _quant(),
        },
        "optuna.samplers.TPESampler": {
            "seed": SEED_OR_NULL, "n_startup_trials": counts, "n_ei_candidates": integer(1, MAX_COUNT),
            "multivariate": boolean, "group": boolean, "constant_liar": boolean, "consider_endpoints": boolean,
            "prior_weight": number(0, lo_open=True),
        },
        "optuna.samplers.NSGAIISampler": {
            "seed": SEED_OR_NULL, "population_size": integer(2, MAX_COUNT),
            "mutation_prob": number(0, 1, null=True), "crossover_prob": number(0, 1), "swapping_prob": number(0, 1),
        },
        "optuna.samplers.GPSampler": {
            "seed": SEED_OR_NULL, "n_startup_trials": counts,
            "deterministic_objective": boolean, "warn_independent_sampling": boolean,
        },
        "optuna.samplers.RandomSampler": {"seed": SEED_OR_NULL},
        "hwnas.search.samplers.RegularizedEvolutionSampler": {
            "seed": SEED_OR_NULL, "population_size": integer(2, MAX_COUNT), "sample_size": integer(1, MAX_COUNT),
            "max_retries": counts,
        },
        "hwnas.search.samplers.RLControllerSampler": {
            "seed": SEED_OR_NULL, "reward": one_of(*REWARDS), "accuracy_index": integer(0, 1000),
            "latency_index": integer(0, 1000), "target": number(0, lo_open=True), "alpha": number(), "beta": number(),
            "learning_rate": number(0, lo_open=True), "entropy_weight": number(0), "baseline_decay": number(0, 1, hi_open=True),
            "clip_ratio": number(0, lo_open=True, null=True), "n_bins": integer(2, 4096), "max_int_bins": integer(2, 4096),
            "max_retries": counts,
        },
        "hwnas.evaluators.pipeline.PipelineEvaluator": {
            "epochs": integer(1, 100_000), "finetune_epochs": integer(0, 100_000), "lr": number(0, 10, lo_open=True),
            "optimizer": one_of(*OPTIMIZERS), "weight_decay": number(0, 1), "accelerator": one_of(*ACCELERATORS),
            "calibration_samples": integer(1, MAX_COUNT), "opset": integer(13, 30), "torch_threads": integer(1, 1024),
        },
        "hwnas.evaluators.tabular.TabularEvaluator": {"table": text, "key": text},
        "hwnas.evaluators.latency.LatencyTarget": LOCAL_TARGET,
        "hwnas.evaluators.measure.local.LocalTarget": LOCAL_TARGET,
        "hwnas.evaluators.measure.remote.RemoteTarget": {
            **TIMING, "urls": agent_urls, "token_env": env_name,
            "timeout_s": number(0, 3600, lo_open=True), "retries": integer(0, 100), "backoff_s": number(0, 600),
        },
        "hwnas.search.runners.ray_runner.RayRunner": {
            "max_concurrent": integer(1, MAX_WORKERS),
            "resources": mapping({"cpu": number(0, MAX_WORKERS, lo_open=True), "gpu": number(0, MAX_WORKERS)}),
            "address": address,
            "storage": lambda key, v: check_storage(v),
            "max_failures": integer(0, 1000),
            "trial_timeout_s": TIMEOUT,
            "connect_timeout_s": CONNECT_TIMEOUT,
        },
        "hwnas.search.schedulers.full.FullTraining": {"latency_first": boolean},
        "hwnas.search.schedulers.moasha.MOASHA": {
            "rungs": rung_list, "reduction_factor": number(1, 1000, lo_open=True),
            "tie_break": one_of("eps_net", "crowding"), "latency_first": boolean,
        },
        "hwnas.search.runners.local_runner.LocalRunner": {
            "max_concurrent": integer(1, MAX_WORKERS), "trial_timeout_s": TIMEOUT,
        },
    }


_SCHEMA: dict[str, dict[str, Check]] | None = None


def check_group(node: DictConfig, group: str) -> None:
    """Each key of a group whose `_target_` is one of ours or Optuna's: its type and range."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = _schema()
    fields = _SCHEMA.get(str(node.get("_target_", "")))
    if fields is None:
        return
    for key in node.keys():
        check = fields.get(str(key))
        if check is not None:
            check(f"{group}.{key!s}", node[key])


# --- a run folder's trial record ---------------------------------------------------------------------


def check_trial_log(path: Path) -> None:
    """trials.jsonl holds one JSON object per line. Only a torn last line (a driver killed mid-write:
    no newline after it) is tolerated, as TrialLog reads it; garbage anywhere else is refused."""
    import json

    if not path.exists():
        return
    if not path.is_file():
        raise ValueProblem(f"run_dir: {str(path)!r} is not a file; allowed: the trials.jsonl hwnas wrote")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1]  # b"" when the file ends with a newline
    for n, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            row = None
        if not isinstance(row, dict) or "number" not in row:
            raise ValueProblem(f"run_dir: {str(path)!r} line {n} is not a trial record; "
                               "allowed: the trials.jsonl hwnas wrote (only a torn last line is skipped)")
    del torn
