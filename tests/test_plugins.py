"""Plug-in policy: every `_target_` is checked as a string before anything is imported.

Canaries: `canary_mod.py`, written into tmp_path, writes a marker file when it is imported. A
refused target must leave no marker, no `canary_mod` in sys.modules, no run folder and no MLflow
database, and give one line naming the key and the target, exit status 2. Routes: a command-line
override, a file in the user's --config-dir, and a run folder's config.yaml (hwnas-export,
hwnas-sync, resume=true). Most cases run `main([...])` in-process (tmp_path on sys.path); one runs
the real command in its own interpreter with tmp_path on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hwnas.search import cli
from hwnas.search.config import ConfigError, compose_config, validate
from hwnas.search.plugins import shipped_targets
from hwnas.search.sweep_state import STATE_FILE

CANARY = '''
import os, pathlib
pathlib.Path(os.environ.get("CANARY_MARKER", "canary_imported")).write_text("imported")
import optuna

class Evil:
    def __init__(self, *args, **kwargs):
        pathlib.Path(os.environ.get("CANARY_MARKER", "canary_imported") + ".called").write_text("called")

class Sampler(optuna.samplers.RandomSampler):
    """A user's own sampler: a real optuna BaseSampler."""
'''


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as cwd, on sys.path, holding canary_mod.py; returns the marker path (absent)."""
    (tmp_path / "canary_mod.py").write_text(CANARY)
    marker = tmp_path / "canary_imported"
    monkeypatch.setenv("CANARY_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "canary_mod", raising=False)
    yield marker
    sys.modules.pop("canary_mod", None)


def _refused(capsys: pytest.CaptureFixture[str], code: int, *named: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    for text in named:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _nothing_happened(tmp_path: Path, marker: Path) -> None:
    assert not marker.exists(), "the canary module was imported"
    assert not Path(str(marker) + ".called").exists(), "the canary was called"
    assert "canary_mod" not in sys.modules
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "results").exists()
    assert not list(tmp_path.rglob("*.db"))


def _run_args(tmp_path: Path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]


# --- route 1: the command line ------------------------------------------------------------------------

OVERRIDES = [
    (["search._target_=builtins.open"], "search._target_", "builtins.open"),
    (["dataset._target_=pandas.read_pickle"], "dataset._target_", "pandas.read_pickle"),
    (["evaluator._target_=torch.load"], "evaluator._target_", "torch.load"),
    (["space._target_=site.addsitedir"], "space._target_", "site.addsitedir"),
    (["runner._target_=imp.load_source"], "runner._target_", "imp.load_source"),
    (["hardware._target_=distutils.spawn.spawn"], "hardware._target_", "distutils.spawn.spawn"),
    (["search._target_=numpy.load"], "search._target_", "numpy.load"),
    (["search._target_=canary_mod.Evil"], "search._target_", "canary_mod.Evil"),
    (["dataset._target_=canary_mod.Evil"], "dataset._target_", "canary_mod.Evil"),
    # nested targets: Hydra instantiates those too
    (["+search.helper={_target_: canary_mod.Evil}"], "search.helper._target_", "canary_mod.Evil"),
    (["+evaluator.extra=[{_target_: canary_mod.Evil}]"], "evaluator.extra[0]._target_", "canary_mod.Evil"),
    (["+space.a.b._target_=builtins.eval"], "space.a.b._target_", "builtins.eval"),
    # groups hwnas never builds may hold no target either
    (["+objective.x._target_=canary_mod.Evil"], "objective.x._target_", "canary_mod.Evil"),
    # Hydra's own settings: a searchpath entry would load config files (pkg:// imports) from elsewhere
    (["hydra.searchpath=[file:///tmp/x]"], "hydra.searchpath", "file:///tmp/x"),
    (["+hydra.searchpath=[pkg://canary_mod]"], "hydra.searchpath", "pkg://canary_mod"),
    (["hydra/launcher=basic"], "hydra/launcher", "basic"),
    # a plug-in prefix may not be the standard library, hwnas or one of its libraries
    (["plugins=[os]", "search._target_=os.system"], "plugins[0]", "'os'"),
    (["plugins=[builtins]", "search._target_=builtins.open"], "plugins[0]", "'builtins'"),
    (["plugins=[torch]", "evaluator._target_=torch.load"], "plugins[0]", "'torch'"),
    (["plugins=[hwnas]"], "plugins[0]", "'hwnas'"),
    (["plugins=[pandas.io]"], "plugins[0]", "'pandas.io'"),
    (["plugins=[joblib]"], "plugins[0]", "'joblib'"),
    (["plugins=['canary_mod; x']"], "plugins[0]", "canary_mod; x"),
    (["plugins=canary_mod"], "plugins", "canary_mod"),
    # a prefix trusts that module, not one whose name merely starts the same
    (["plugins=[canary]", "search._target_=canary_mod.Evil"], "search._target_", "canary_mod.Evil"),
]


@pytest.mark.parametrize(("args", "key", "target"), OVERRIDES, ids=[" ".join(a) for a, _, _ in OVERRIDES])
def test_override_refused_before_import(canary: Path, tmp_path: Path, capsys, args, key, target) -> None:
    line = _refused(capsys, cli.main([*args, *_run_args(tmp_path)]), f"{key}", target)
    assert line.startswith("hwnas: error: ")
    assert "allowed" in line
    _nothing_happened(tmp_path, canary)


def test_refusal_line_lists_hwnas_own_classes(canary: Path, tmp_path: Path, capsys) -> None:
    line = _refused(capsys, cli.main(["search._target_=builtins.open", *_run_args(tmp_path)]))
    assert line.startswith(
        "hwnas: error: search._target_: 'builtins.open' is not allowed; allowed: hwnas' own search classes ("
    )
    assert "optuna.samplers.TPESampler" in line and "hwnas.search.samplers.RegularizedEvolutionSampler" in line
    assert line.endswith("or a module named in plugins=[...]")


def test_cfg_also_refuses(canary: Path, tmp_path: Path, capsys) -> None:
    _refused(capsys, cli.main(["--cfg", "search._target_=canary_mod.Evil"]), "search._target_", "canary_mod.Evil")
    _nothing_happened(tmp_path, canary)


def test_python_api_refuses(canary: Path, tmp_path: Path) -> None:
    import hwnas

    with pytest.raises(hwnas.ConfigError, match=r"^search\._target_: 'canary_mod\.Evil' is not allowed"):
        hwnas.run(["search._target_=canary_mod.Evil", *_run_args(tmp_path)])
    _nothing_happened(tmp_path, canary)


# --- route 2: the user's own config files (--config-dir) ------------------------------------------------


def _config_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "myconf"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_experiment_file_naming_a_forbidden_target_is_refused(canary: Path, tmp_path: Path, capsys) -> None:
    d = _config_dir(tmp_path, {"experiment/evil.yaml": "# @package _global_\nsearch:\n  _target_: canary_mod.Evil\n"})
    code = cli.main(["--config-dir", str(d), "experiment=evil", *_run_args(tmp_path)])
    _refused(capsys, code, "search._target_", "canary_mod.Evil")
    _nothing_happened(tmp_path, canary)


def test_group_file_naming_a_forbidden_target_is_refused(canary: Path, tmp_path: Path, capsys) -> None:
    d = _config_dir(tmp_path, {"dataset/mine.yaml": "_target_: pandas.read_pickle\nfilepath_or_buffer: x.pkl\n"})
    code = cli.main([f"--config-dir={d}", "dataset=mine", *_run_args(tmp_path)])
    _refused(capsys, code, "dataset._target_", "pandas.read_pickle")
    _nothing_happened(tmp_path, canary)


def test_user_config_file_may_not_set_hydra(canary: Path, tmp_path: Path, capsys) -> None:
    d = _config_dir(tmp_path, {"experiment/sp.yaml": "# @package _global_\nhydra:\n  searchpath: [pkg://canary_mod]\n"})
    _refused(capsys, cli.main(["--config-dir", str(d), "experiment=sp", *_run_args(tmp_path)]), "hydra", "sp.yaml")
    _nothing_happened(tmp_path, canary)


def test_unknown_choice_lists_the_users_own(tmp_path: Path, capsys) -> None:
    d = _config_dir(tmp_path, {"search/mine.yaml": "_target_: optuna.samplers.QMCSampler\nseed: ${seed}\n"})
    line = _refused(capsys, cli.main(["--config-dir", str(d), "search=nope"]), "search=nope", "mine", "tpe")
    assert "unknown choice" in line


def test_users_own_group_file_of_an_allowed_target(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, {"search/qmc.yaml": "_target_: optuna.samplers.QMCSampler\nseed: ${seed}\n"})
    cfg = compose_config(["--config-dir", str(d), "search=qmc", "run_dir=unused"])
    validate(cfg)
    assert cfg.search._target_ == "optuna.samplers.QMCSampler"
    # the shipped files come first: a user file cannot shadow hwnas' own choice of the same name
    d2 = _config_dir(tmp_path, {"search/tpe.yaml": "_target_: canary_mod.Evil\n"})
    assert compose_config(["--config-dir", str(d2), "search=tpe"]).search._target_ == "optuna.samplers.TPESampler"


# --- positive: a plug-in the user names is imported and built -------------------------------------------


def test_plugin_named_on_the_command_line_is_imported_and_built(canary: Path, tmp_path: Path) -> None:
    from hwnas.search.experiment import build_experiment

    cfg = compose_config(["plugins=[canary_mod]", "search=random", "search._target_=canary_mod.Sampler",
                          "dataset=synthetic", "runner=local", "tracking.enabled=false", "run_dir=unused"])
    validate(cfg)
    assert canary.exists()  # imported, as the user asked
    built = build_experiment(cfg)
    assert type(built.sweep.sampler).__module__ == "canary_mod"


def test_plugin_named_in_the_users_own_config_file(canary: Path, tmp_path: Path) -> None:
    d = _config_dir(tmp_path, {"experiment/mine.yaml": (
        "# @package _global_\nplugins: [canary_mod]\nsearch:\n  _target_: canary_mod.Sampler\n"
        "  seed: ${seed}\n")})
    cfg = compose_config(["--config-dir", str(d), "search=random", "experiment=mine", "run_dir=unused"])
    validate(cfg)
    assert canary.exists()


def test_plugin_prefix_covers_submodules_only_at_a_dot() -> None:
    from hwnas.search.plugins import target_allowed

    assert target_allowed("mylab.search.Sampler", "search", ["mylab"])
    assert target_allowed("mylab.search.Sampler", "search", ["mylab.search"])
    assert not target_allowed("mylabx.Sampler", "search", ["mylab"])
    assert not target_allowed("mylab.other.Sampler", "search", ["mylab.search"])
    assert not target_allowed("hwnas.evaluators.data.DigitsData", "search", [])  # another group's class
    assert target_allowed("hwnas.evaluators.data.DigitsData", "dataset", [])


def test_plugin_that_builds_the_wrong_type_is_refused_after_building(canary: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["plugins=[canary_mod]", "search=random", "search._target_=canary_mod.Evil", *_run_args(tmp_path)])
    _refused(capsys, code, "search: canary_mod.Evil built a Evil, not an optuna BaseSampler")
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("*.db"))


@pytest.mark.parametrize("group", ["dataset", "space", "hardware", "runner", "evaluator"])
def test_every_group_checks_its_interface(canary: Path, tmp_path: Path, capsys, group: str) -> None:
    from conftest import NB201_METRICS, make_nb201_table

    make_nb201_table(tmp_path / "t.csv")
    code = cli.main(["plugins=[canary_mod]", f"{group}._target_=canary_mod.Evil", "experiment=nb201_tabular",
                     f"evaluator.table={tmp_path / 't.csv'}", NB201_METRICS, *_run_args(tmp_path)])
    line = _refused(capsys, code, f"{group}: canary_mod.Evil built a Evil, not ")
    assert "is not allowed" not in line


def test_allowlist_is_derived_from_the_shipped_files() -> None:
    own = shipped_targets()
    assert own["search"] >= {"optuna.samplers.TPESampler", "optuna.samplers.NSGAIISampler", "optuna.samplers.GPSampler",
                             "optuna.samplers.RandomSampler", "hwnas.search.samplers.RLControllerSampler"}
    assert own["dataset"] == {
        f"hwnas.evaluators.data.{name}"
        for name in ("DigitsData", "SyntheticData", "ImageFolderData", "NpzData", "Cifar10Data", "Cifar100Data", "LightningData")
    }  # and not the `???` of dataset=lightning's module: the user's class must be a plug-in
    assert own["runner"] == {"hwnas.search.runners.local_runner.LocalRunner", "hwnas.search.runners.ray_runner.RayRunner"}
    for targets in own.values():
        assert all(t.startswith(("hwnas.", "optuna.samplers.")) for t in targets)


# --- route 3: a run folder's config.yaml (hwnas-export, hwnas-sync, resume=true) ------------------------


def _run_folder(tmp_path: Path, **changes: object) -> Path:
    """A run folder as hwnas writes it (resolved config, state, one trial), with `changes` applied
    to its config.yaml (dotted key -> YAML value)."""
    cfg = compose_config(["dataset=synthetic", "runner=local", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                          f"run_dir={tmp_path / 'shared'}"])
    validate(cfg)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    (run_dir / STATE_FILE).write_text(json.dumps({"study_name": "default", "parent_run_id": None}))
    row = {"number": 0, "status": "COMPLETE", "arch_id": "a", "net_id": "a", "candidate": {}, "node": "n",
           "metrics": {"val_accuracy": 0.5, "latency_ms": 1.0}, "artifact": None, "feasible": True}
    (run_dir / "trials.jsonl").write_text(json.dumps(row) + "\n")
    return run_dir


@pytest.fixture
def evil_folder(canary: Path, tmp_path: Path) -> Path:
    return _run_folder(tmp_path, **{"search._target_": "canary_mod.Evil", "plugins": ["canary_mod"]})


def _folder_untouched(run_dir: Path, tmp_path: Path, marker: Path) -> None:
    assert not marker.exists() and "canary_mod" not in sys.modules
    assert not (run_dir / "export").exists()
    assert not list(tmp_path.rglob("*.db"))


def test_export_refuses_a_run_folder_target(evil_folder: Path, canary: Path, tmp_path: Path, capsys) -> None:
    line = _refused(capsys, cli.export_main([f"run_dir={evil_folder}"]), "search._target_", "'canary_mod.Evil'",
                    "config.yaml", "on this command line")
    assert line.startswith("hwnas-export: error: ")
    _folder_untouched(evil_folder, tmp_path, canary)


def test_sync_refuses_a_run_folder_target(evil_folder: Path, canary: Path, tmp_path: Path, capsys) -> None:
    line = _refused(capsys, cli.sync_main([f"run_dir={evil_folder}"]), "search._target_", "'canary_mod.Evil'")
    assert line.startswith("hwnas-sync: error: ")
    _folder_untouched(evil_folder, tmp_path, canary)


def test_resume_refuses_a_run_folder_target(evil_folder: Path, canary: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["dataset=synthetic", "runner=local", "resume=true", f"run_dir={evil_folder}",
                     f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    _refused(capsys, code, "search._target_", "'canary_mod.Evil'", "config.yaml")
    _folder_untouched(evil_folder, tmp_path, canary)


def test_a_run_folders_own_plugins_are_ignored_until_the_command_line_names_them(
        evil_folder: Path, canary: Path, tmp_path: Path, capsys) -> None:
    # The folder lists plugins: [canary_mod]; that alone trusts nothing (above). Named on the
    # current command line, the target is imported, built, and then fails its interface check.
    line = _refused(capsys, cli.export_main([f"run_dir={evil_folder}", "plugins=[canary_mod]"]),
                    "search: canary_mod.Evil built a Evil, not an optuna BaseSampler")
    assert canary.exists()
    assert line.startswith("hwnas-export: error: ")


def test_run_folder_interpolation_is_refused(canary: Path, tmp_path: Path, capsys) -> None:
    run_dir = _run_folder(tmp_path, **{"tracking.uri": "${oc.env:SECRET_TOKEN}"})
    _refused(capsys, cli.sync_main([f"run_dir={run_dir}"]), "tracking.uri", "${oc.env:SECRET_TOKEN}", "interpolation")
    _refused(capsys, cli.export_main([f"run_dir={run_dir}"]), "tracking.uri", "interpolation")


def test_run_folder_hydra_node_is_refused(canary: Path, tmp_path: Path, capsys) -> None:
    run_dir = _run_folder(tmp_path)
    text = (run_dir / "config.yaml").read_text() + "hydra:\n  searchpath: [pkg://canary_mod]\n"
    (run_dir / "config.yaml").write_text(text)
    _refused(capsys, cli.export_main([f"run_dir={run_dir}"]), "hydra", "config.yaml")
    _folder_untouched(run_dir, tmp_path, canary)


def test_export_refuses_an_artifact_outside_the_run_folder(canary: Path, tmp_path: Path, capsys) -> None:
    run_dir = _run_folder(tmp_path, **{"tracking.enabled": False})
    secret = tmp_path / "secret.onnx"
    secret.write_text("not for the export")
    row = json.loads((run_dir / "trials.jsonl").read_text())
    row["artifact"] = str(run_dir / "trials" / ".." / ".." / "secret.onnx")
    (run_dir / "trials.jsonl").write_text(json.dumps(row) + "\n")
    line = _refused(capsys, cli.export_main([f"run_dir={run_dir}"]), "secret.onnx", "outside the run folder", "trials.jsonl")
    assert "trial 0" in line
    assert not (run_dir / "export").exists()


@pytest.mark.parametrize(("op", "named"), [
    ({"op": "op_sweep_outputs", "parent": "p", "paths": ["/etc/passwd"], "metrics": {}}, "/etc/passwd"),
    ({"op": "op_trial_ended", "parent": "p", "number": 0, "candidate": {}, "metrics": {}, "tags": {},
      "artifact": "/etc/hostname", "status": "FINISHED"}, "/etc/hostname"),
    ({"op": "__init__", "uri": "http://elsewhere"}, "'__init__'"),
])
def test_sync_refuses_a_pending_upload_outside_the_run_folder(tmp_path: Path, capsys, op: dict, named: str) -> None:
    run_dir = _run_folder(tmp_path)
    (run_dir / "mlflow_pending.jsonl").write_text(json.dumps(op) + "\n")
    _refused(capsys, cli.sync_main([f"run_dir={run_dir}"]), "mlflow_pending.jsonl", named)
    assert not list(tmp_path.rglob("*.db"))


def test_real_export_command_never_imports_a_run_folder_target(evil_folder: Path, tmp_path: Path) -> None:
    # The shipped entry point in its own interpreter, tmp_path on PYTHONPATH as a colleague's folder might be.
    marker = tmp_path / "subprocess_marker"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CANARY_MARKER": str(marker)}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from hwnas.search.cli import export_main; sys.exit(export_main())",
         f"run_dir={evil_folder}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "search._target_" in lines[0] and "canary_mod.Evil" in lines[0], proc.stderr
    assert not marker.exists()
    assert not (evil_folder / "export").exists()


def test_check_target_kwargs_never_imports_a_refused_name(canary: Path) -> None:
    from hwnas.search.config import check_target_kwargs

    with pytest.raises(ConfigError, match="search._target_: 'canary_mod.Evil' is not allowed"):
        check_target_kwargs(OmegaConf.create({"_target_": "canary_mod.Evil"}), "search")
    assert not canary.exists()


def test_a_trusted_plugin_that_does_not_import_is_one_line_with_the_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hwnas.search.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plugins=[nosuchlab]", "search._target_=nosuchlab.Sampler"]) == 2
    err = capsys.readouterr().err
    assert err == "hwnas: error: search._target_: 'nosuchlab.Sampler' cannot be imported (No module named 'nosuchlab')\n"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_override_is_named_even_beside_an_experiment_from_config_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hydra's "already at" error names no override: each is tried alone to find it, with the user's
    # --config-dir too (without it, experiment=mine itself failed and was blamed).
    from hwnas.search.cli import main

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("# @package _global_\nn_trials: 3\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--config-dir", str(tmp_path / "conf"), "experiment=mine", "+seed=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hwnas: error: seed: '+seed=3' cannot be applied") and err.count("\n") == 1
