"""Every bad input is refused before any side effect: one line `PROG: error: KEY...`, exit status 2,
no run folder, no MLflow database, no Ray. In-process (`main([...])` with the default relative
tracking URI in an empty folder), plus real commands for the reachability bounds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hwnas.search.cli import export_main, main, sync_main

ROOT = Path(__file__).resolve().parent.parent
GARBAGE = bytes(range(256)) * 8

# (overrides, the key the error line must name). {tmp} is the test's empty working folder.
HWNAS = [
    # non-finite numbers, anywhere in the tree
    (["objective.latency_budget_ms=nan"], "objective.latency_budget_ms"),
    (["objective.latency_budget_ms=inf"], "objective.latency_budget_ms"),
    (["objective.latency_budget_ms=-inf"], "objective.latency_budget_ms"),
    (["+objective.budgets.model_bytes=inf"], "objective.budgets.model_bytes"),
    (["+objective.budgets.x=nan"], "objective.budgets.x"),
    (["space.prune_ratios=[0.1,nan]"], "space.prune_ratios[1]"),
    (["hardware.warmup=inf"], "hardware.warmup"),
    (["runner.resources.cpu=nan"], "runner.resources.cpu"),
    (["runner.resources.gpu=inf"], "runner.resources.gpu"),
    (["runner.trial_timeout_s=inf"], "runner.trial_timeout_s"),
    (["evaluator.lr=nan"], "evaluator.lr"),
    (["evaluator.weight_decay=inf"], "evaluator.weight_decay"),
    (["dataset.val_fraction=nan"], "dataset.val_fraction"),
    (["search=rl", "search.target=inf"], "search.target"),
    (["tracking.connect_timeout_s=nan"], "tracking.connect_timeout_s"),
    (["runner.connect_timeout_s=inf"], "runner.connect_timeout_s"),
    # types, empties, nulls, ranges at the top
    (["n_trials=ten"], "n_trials"),
    (["n_trials="], "n_trials"),
    (["n_trials=null"], "n_trials"),
    (["n_trials=0"], "n_trials"),
    (["n_trials=-3"], "n_trials"),
    (["n_trials=1.5"], "n_trials"),
    (["n_trials=true"], "n_trials"),
    (["n_trials=1000000000000"], "n_trials"),
    (["seed=[1]"], "seed"),
    (["seed=-1"], "seed"),
    (["seed=4294967296"], "seed"),
    (["resume=yes"], "resume"),
    (["resume=1"], "resume"),
    (["+newkey=1"], "newkey"),
    (["~dataset"], "dataset"),
    (["~n_trials"], "n_trials"),
    (["dataset=imagenet"], "dataset"),
    # names that become paths
    (["experiment_name=a/b"], "experiment_name"),
    (["experiment_name=.."], "experiment_name"),
    (["experiment_name=../../etc"], "experiment_name"),
    (["experiment_name="], "experiment_name"),
    (["experiment_name='a b'"], "experiment_name"),
    (["experiment_name=.hidden"], "experiment_name"),
    (["experiment_name=" + "x" * 101], "experiment_name"),
    (["tracking.experiment=x/y"], "tracking.experiment"),
    (["tracking.registered_model='m n'"], "tracking.registered_model"),
    # run_dir
    (["run_dir="], "run_dir"),
    (["run_dir=."], "run_dir"),
    (["run_dir=.."], "run_dir"),
    (["run_dir=/"], "run_dir"),
    (["run_dir=null"], "run_dir"),
    (["run_dir={tmp}/afile"], "run_dir"),
    (["run_dir={tmp}/afile/sub"], "run_dir"),
    (["resume=true", "run_dir={tmp}/nosweep"], "resume"),
    # tracking
    (["tracking.uri=ftp://example.invalid/x"], "tracking.uri"),
    (["tracking.uri=file:/tmp/x"], "tracking.uri"),
    (["tracking.uri=/tmp/mlflow.db"], "tracking.uri"),
    (["tracking.uri=postgresql://u@localhost/db"], "tracking.uri"),
    (["tracking.uri="], "tracking.uri"),
    (["tracking.uri=sqlite://"], "tracking.uri"),
    (["tracking.uri=sqlite:///{tmp}/afile/m.db"], "tracking.uri"),
    (["tracking.uri=sqlite:///{tmp}/afile"], "tracking.uri"),
    (["tracking.uri=sqlite:///{tmp}/adir"], "tracking.uri"),
    (["tracking.uri=http://"], "tracking.uri"),
    (["tracking.uri=http://127.0.0.1:99999"], "tracking.uri"),
    (["tracking.enabled=maybe"], "tracking.enabled"),
    (["tracking.connect_timeout_s=0"], "tracking.connect_timeout_s"),
    (["+tracking.colour=red"], "tracking.colour"),
    # runner
    (["runner.address=nohost"], "runner.address"),
    (["runner.address=127.0.0.1:0"], "runner.address"),
    (["runner.address=ray://127.0.0.1:70000"], "runner.address"),
    (["runner.address=http://127.0.0.1:6379"], "runner.address"),
    (["runner.address=5"], "runner.address"),
    (["runner.max_concurrent=0"], "runner.max_concurrent"),
    (["runner.max_concurrent=two"], "runner.max_concurrent"),
    (["runner.resources=[1]"], "runner.resources"),
    (["+runner.resources.tpu=1"], "runner.resources.tpu"),
    (["runner.resources.cpu=0"], "runner.resources.cpu"),
    (["runner.max_failures=-1"], "runner.max_failures"),
    (["runner.trial_timeout_s=0"], "runner.trial_timeout_s"),
    (["runner.connect_timeout_s=0"], "runner.connect_timeout_s"),
    (["runner.storage="], "runner.storage"),
    (["runner.storage={tmp}/afile"], "runner.storage"),
    (["runner=local", "runner.max_concurrent=2"], "runner.max_concurrent"),
    # space
    (["space.widths={a:1}"], "space.widths"),
    (["space.widths=[]"], "space.widths"),
    (["space.widths=[8,8]"], "space.widths"),
    (["space.widths=[0]"], "space.widths"),
    (["space.widths=[8,x]"], "space.widths"),
    (["space.kernels=[2]"], "space.kernels"),
    (["space.n_stages=[7]"], "space.n_stages"),
    (["space.blocks=[conv,lstm]"], "space.blocks"),
    (["space.quant=[int3]"], "space.quant"),
    (["space.prune_ratios=[1.0]"], "space.prune_ratios"),
    (["space.stem_stride=3"], "space.stem_stride"),
    (["space.stem_width=true"], "space.stem_width"),
    (["+space.colour=red"], "space.colour"),
    (["space=nb201", "space.ops=[none,conv9]"], "space.ops"),
    (["space=nb201", "space.C=0"], "space.C"),
    # search
    (["search.seed=-1"], "search.seed"),
    (["search.n_startup_trials=-1"], "search.n_startup_trials"),
    (["search.multivariate=sometimes"], "search.multivariate"),
    (["search=nsga2", "search.population_size=1"], "search.population_size"),
    (["search=evolution", "search.sample_size=0"], "search.sample_size"),
    (["search=rl", "search.reward=speed"], "search.reward"),
    (["search=rl", "search.baseline_decay=1"], "search.baseline_decay"),
    (["search=gp", "search.deterministic_objective=2"], "search.deterministic_objective"),
    # dataset, evaluator, hardware, objective, select
    (["dataset.resolution=4"], "dataset.resolution"),
    (["dataset.channels=2"], "dataset.channels"),
    (["dataset.batch_size=1.5"], "dataset.batch_size"),
    (["dataset.val_fraction=0.6", "dataset.test_fraction=0.6"], "val_fraction"),
    (["dataset=synthetic", "dataset.noise=-1"], "dataset.noise"),
    (["evaluator.epochs=0"], "evaluator.epochs"),
    (["evaluator.optimizer=lbfgs"], "evaluator.optimizer"),
    (["evaluator.accelerator=gpu"], "evaluator.accelerator"),
    (["evaluator.opset=9"], "evaluator.opset"),
    (["hardware.provider=tpu"], "hardware.provider"),
    (["hardware.name="], "hardware.name"),
    (["hardware.repeats=0"], "hardware.repeats"),
    (["objective.latency_budget_ms=0"], "objective.latency_budget_ms"),
    (["objective.latency_budget_ms=fast"], "objective.latency_budget_ms"),
    (["objective.metrics=[{name: val_accuracy, mode: up}]"], "objective.metrics[0].mode"),
    (["objective.metrics={a: 1}"], "objective.metrics"),
    (["objective.budgets=[1]"], "objective.budgets"),
    (["select.rule=pareto"], "select.rule"),
]

TABLES = [
    ("garbage.csv", GARBAGE),
    ("empty.csv", b""),
    ("header_only.csv", b"arch,acc\n"),
    ("nokey.csv", b"name,acc\na,1\n"),
    ("dups.csv", b"arch,acc\na,1\na,2\n"),
    ("text_metric.csv", b"arch,cifar10-val,latency_ms\na,good,1\n"),
    ("fake.parquet", b"this is not parquet at all\n"),
    ("adir.csv", None),
    ("missing.csv", None),
    ("table.txt", b"arch,acc\na,1\n"),
]


def _refused(capsys: pytest.CaptureFixture[str], code: int, prog: str, key: str, tmp: Path, before: set[str]) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert key in lines[0], err
    assert "allowed" in lines[0] or "usage" in lines[0], err
    assert {str(p.relative_to(tmp)) for p in tmp.rglob("*")} == before, "something was written"
    import ray

    assert not ray.is_initialized()


def _fixtures(tmp: Path) -> set[str]:
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


@pytest.mark.parametrize(("args", "key"), HWNAS, ids=[" ".join(a)[:60] for a, _ in HWNAS])
def test_hwnas_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                       args: list[str], key: str) -> None:
    monkeypatch.chdir(tmp_path)
    before = _fixtures(tmp_path)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    _refused(capsys, code, "hwnas", key, tmp_path, before)


@pytest.mark.parametrize(("name", "content"), TABLES, ids=[t[0] for t in TABLES])
def test_bad_table_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                           name: str, content: bytes | None) -> None:
    monkeypatch.chdir(tmp_path)
    if name == "adir.csv":
        (tmp_path / name).mkdir()
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    code = main(["experiment=nb201_tabular", f"evaluator.table={name}"])
    err = capsys.readouterr().err
    assert name in err, err
    capsys.readouterr()
    print(err, end="", file=sys.stderr)
    _refused(capsys, code, "hwnas", "evaluator.table", tmp_path, before)


def test_table_with_binary_garbage_names_key_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_bytes(GARBAGE)
    assert main(["experiment=nb201_tabular", "evaluator.table=t.csv"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("hwnas: error: evaluator.table: 't.csv'") and "allowed" in line


# --- hwnas-export and hwnas-sync ---------------------------------------------------------------------


def _run_folder(tmp: Path, name: str = "run", trials: bytes | None = None, config: bytes | None = None) -> Path:
    """A finished tabular sweep's folder, as far as these commands read it before refusing."""
    from hwnas.search.config import compose_config

    run = tmp / name
    run.mkdir()
    table = tmp / "t.csv"
    if not table.exists():
        table.write_text("arch,cifar10-val,latency_ms\nx,0.5,1.0\n")
    cfg = compose_config(["experiment=nb201_tabular", f"evaluator.table={table}", f"run_dir={run}"])
    (run / "config.yaml").write_bytes(config if config is not None else OmegaConf.to_yaml(cfg, resolve=True).encode())
    (run / "trials.jsonl").write_bytes(trials if trials is not None else b'{"number": 0, "status": "COMPLETE"}\n')
    return run


EXPORT = [
    ([], "run_dir"),
    (["run_dir="], "run_dir"),
    (["run_dir={tmp}/nowhere"], "run_dir"),
    (["run_dir={tmp}/afile"], "run_dir"),
    (["run_dir={run}", "n_trials=5"], "n_trials"),
    (["run_dir={run}", "objective.latency_budget_ms=nan"], "objective.latency_budget_ms"),
    (["run_dir={run}", "objective.latency_budget_ms=inf"], "objective.latency_budget_ms"),
    (["run_dir={run}", "objective.latency_budget_ms=-1"], "objective.latency_budget_ms"),
    (["run_dir={run}", "+objective.colour=red"], "objective.colour"),
    (["run_dir={run}", "select=pareto"], "select"),
    (["run_dir={run}", "tracking.uri=ftp://example.invalid"], "tracking.uri"),
    (["run_dir={run}", "tracking.experiment=../x"], "tracking.experiment"),
    (["run_dir={run}", "tracking.enabled=true", "tracking.uri=sqlite:///{tmp}/afile/m.db"], "tracking.uri"),
    (["run_dir={garbage_trials}"], "trials.jsonl"),
    (["run_dir={binary_config}"], "run_dir"),
    (["run_dir={list_config}"], "run_dir"),
]

SYNC = [
    ([], "run_dir"),
    (["run_dir="], "run_dir"),
    (["run_dir={tmp}/nowhere"], "run_dir"),
    (["run_dir={tmp}/afile"], "run_dir"),
    (["run_dir={run}", "n_trials=5"], "n_trials"),
    (["run_dir={run}", "tracking.uri=ftp://example.invalid"], "tracking.uri"),
    (["run_dir={run}", "tracking.uri=sqlite://"], "tracking.uri"),
    (["run_dir={run}", "tracking.uri="], "tracking.uri"),
    (["run_dir={binary_config}"], "run_dir"),
    (["run_dir={garbage_trials}"], "trials.jsonl"),
]


def _folders(tmp: Path) -> dict[str, str]:
    return {
        "tmp": str(tmp),
        "run": str(_run_folder(tmp)),
        "garbage_trials": str(_run_folder(tmp, "g", trials=b'{"number": 0}\n' + GARBAGE + b"\n{\"number\": 1}\n")),
        "binary_config": str(_run_folder(tmp, "b", config=GARBAGE)),
        "list_config": str(_run_folder(tmp, "l", config=b"- 1\n- 2\n")),
    }


@pytest.mark.parametrize(("args", "key"), EXPORT, ids=[" ".join(a)[:60] or "none" for a, _ in EXPORT])
def test_export_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        args: list[str], key: str) -> None:
    monkeypatch.chdir(tmp_path)
    where = _folders(tmp_path)
    before = _fixtures(tmp_path)
    code = export_main([a.format(**where) for a in args])
    _refused(capsys, code, "hwnas-export", key, tmp_path, before)


@pytest.mark.parametrize(("args", "key"), SYNC, ids=[" ".join(a)[:60] or "none" for a, _ in SYNC])
def test_sync_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                      args: list[str], key: str) -> None:
    monkeypatch.chdir(tmp_path)
    where = _folders(tmp_path)
    before = _fixtures(tmp_path)
    code = sync_main([a.format(**where) for a in args])
    _refused(capsys, code, "hwnas-sync", key, tmp_path, before)


def test_torn_last_line_is_still_tolerated(tmp_path: Path) -> None:
    from hwnas.search.checks import check_trial_log

    path = tmp_path / "trials.jsonl"
    path.write_bytes(b'{"number": 0}\n{"numb')
    check_trial_log(path)  # a driver killed mid-write: not an error
    path.write_bytes(b'{"number": 0}\n{"numb\n{"number": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        check_trial_log(path)


# --- reachability, bounded in time: the real command -------------------------------------------------


_STARTUP = [0.0]


@pytest.fixture(autouse=True)
def _startup(request: pytest.FixtureRequest) -> None:
    if "silent_listener" in request.fixturenames or "closed" in request.node.name:
        _STARTUP[0] = request.getfixturevalue("startup_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_listener():
    """A loopback port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _hwnas(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "RAY_ADDRESS"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from hwnas.search.cli import main; sys.exit(main())",
         "runner.connect_timeout_s=3", "tracking.connect_timeout_s=3", *args],
        cwd=tmp, capture_output=True, text=True, timeout=60, env=env,
    )
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def startup_s(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Seconds the command takes to refuse a plain bad value here (interpreter and imports, on
    shared cores): what a reachability refusal may take on top of its connect timeout."""
    proc, took = _hwnas(tmp_path_factory.mktemp("baseline"), "n_trials=0")
    assert proc.returncode == 2, proc.stderr
    return took


def _assert_refused_in_time(proc: subprocess.CompletedProcess[str], took: float, key: str, tmp: Path) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"hwnas: error: {key}"), proc.stderr
    assert took < 10 or took - _STARTUP[0] < 3 + 2, (took, _STARTUP)
    assert list(tmp.iterdir()) == []


def test_ray_address_closed_port(tmp_path: Path) -> None:
    proc, took = _hwnas(tmp_path, f"runner.address=127.0.0.1:{_free_port()}")
    _assert_refused_in_time(proc, took, "runner.address", tmp_path)


def test_ray_address_silent_listener(tmp_path: Path, silent_listener: int) -> None:
    proc, took = _hwnas(tmp_path, f"runner.address=127.0.0.1:{silent_listener}")
    _assert_refused_in_time(proc, took, "runner.address", tmp_path)
    assert "3 s" in proc.stderr


def test_ray_client_address_silent_listener(tmp_path: Path, silent_listener: int) -> None:
    proc, took = _hwnas(tmp_path, f"runner.address=ray://127.0.0.1:{silent_listener}")
    _assert_refused_in_time(proc, took, "runner.address", tmp_path)


def test_tracking_server_closed_port(tmp_path: Path) -> None:
    proc, took = _hwnas(tmp_path, f"tracking.uri=http://127.0.0.1:{_free_port()}")
    _assert_refused_in_time(proc, took, "tracking.uri", tmp_path)


def test_tracking_server_silent_listener(tmp_path: Path, silent_listener: int) -> None:
    proc, took = _hwnas(tmp_path, f"tracking.uri=http://127.0.0.1:{silent_listener}")
    _assert_refused_in_time(proc, took, "tracking.uri", tmp_path)
