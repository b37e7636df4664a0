"""Warm starts (issue 13, item 6): `warm_start=RUN_DIR` seeds a new sweep's study with an earlier sweep's
trials, which are no evaluations of the new sweep; `evaluator.init_from=PATH` starts every candidate from
pretrained weights (safetensors or a weights-only torch state_dict).

One tiny sweep (smoke, local runner, no MLflow), then a second warm-started from it with init_from; the
refusals run in-process through the same compose + validate the CLI runs (one through the CLI: exit 2).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from conftest import hwnas, output_of, read_jsonl
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hwnas.search.config import ConfigError
from hwnas.search.launch import compose
from hwnas.search.study_record import WARM_START, evaluated_trials
from hwnas.search.sweep_state import SweepState, journal_storage

N_FIRST, N_SECOND = 3, 2


class Payload:
    """What a pickle-only checkpoint holds: an object to construct, never a state_dict."""

SMOKE = ("experiment=smoke", "runner=local", "search=tpe", "tracking.enabled=false")


def _space_and_shape(run_dir: Path) -> tuple[Any, tuple[int, int, int], int]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = json.loads((run_dir / "data.json").read_text())
    return instantiate(cfg.space), tuple(data["input_shape"]), len(data["classes"])


def _network(run_dir: Path, candidate: dict[str, Any]) -> Any:
    space, shape, classes = _space_and_shape(run_dir)
    return space.build(candidate, shape, classes)


def _study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=SweepState.load(run_dir).study_name, storage=journal_storage(run_dir))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("warm") / "first"
    proc = hwnas(*SMOKE, f"n_trials={N_FIRST}", f"run_dir={run_dir}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    return run_dir


@pytest.fixture(scope="module")
def weights(first: Path) -> Path:
    """A safetensors file of the first sweep's first candidate network (its initial weights)."""
    from safetensors.torch import save_file

    row = read_jsonl(first / "trials.jsonl")[0]
    net = _network(first, row["candidate"])
    path = first.parent / "init.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_warm_started_sweep_seeds_study_but_counts_only_its_own(first: Path, weights: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_dir = tmp_path / "second"
    proc = hwnas(*SMOKE, f"n_trials={N_SECOND}", f"run_dir={run_dir}", f"warm_start={first}",
                 f"evaluator.init_from={weights}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    assert f"warm start: {N_FIRST} trial(s)" in proc.stdout

    earlier = {r["number"]: r for r in read_jsonl(first / "trials.jsonl")}
    study = _study(run_dir)
    seeded = [t for t in study.trials if WARM_START in t.user_attrs]
    assert len(seeded) == N_FIRST and all(t.user_attrs[WARM_START] == str(first.resolve()) for t in seeded)
    for t in seeded:  # the earlier values and candidates, with the space's distributions
        row = earlier[t.user_attrs["warm_start_number"]]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.params == row["candidate"]
        assert t.values == [row["metrics"]["val_accuracy"], row["metrics"]["latency_ms"]]
        assert set(t.distributions) == set(t.params)
    # Only this sweep's evaluations are its trials: trials.csv, the count, the broker's record.
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == N_SECOND and (trials["status"] == "COMPLETE").all(), trials
    assert not set(trials["number"]) & {t.number for t in seeded}
    assert sorted(t.number for t in evaluated_trials(study)) == sorted(trials["number"])
    assert f"{N_SECOND}/{N_SECOND} done" in proc.stdout

    # init_from: each trial loaded exactly the file's tensors that fit its network.
    state = load_file(str(weights))
    for row in read_jsonl(run_dir / "trials.jsonl"):
        own = _network(first, row["candidate"]).state_dict()
        fit = sum(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in state.items())
        assert row["metrics"]["init_loaded_tensors"] == fit, row["candidate"]
        assert row["metrics"]["init_skipped_tensors"] == len(state) - fit
    assert trials["init_loaded_tensors"].notna().all()

    # Resumed, the study is not seeded twice.
    from hwnas.search.objectives import Objectives
    from hwnas.search.warm_start import seed_study

    cfg = OmegaConf.load(run_dir / "config.yaml")
    space, _, _ = _space_and_shape(run_dir)
    objectives = Objectives.from_config(OmegaConf.to_container(cfg.objective, resolve=True))
    assert seed_study(study, str(first), space, objectives) == 0
    assert len([t for t in _study(run_dir).trials if WARM_START in t.user_attrs]) == N_FIRST


def test_broker_answers_no_repeat_from_seeded_trials(first: Path) -> None:
    from hwnas.search.broker import Broker
    from hwnas.search.objectives import Objectives
    from hwnas.search.warm_start import seed_study

    cfg = OmegaConf.load(first / "config.yaml")
    space, _, _ = _space_and_shape(first)
    objectives = Objectives.from_config(OmegaConf.to_container(cfg.objective, resolve=True))
    study = optuna.create_study(directions=objectives.optuna_directions)
    assert seed_study(study, str(first), space, objectives) == N_FIRST
    broker = Broker(study, space, objectives, n_trials=1)
    assert broker._outcomes == {}  # a seeded candidate proposed again is evaluated here, on this device
    # The first sweep's first candidate, proposed again, is handed out for evaluation.
    study.enqueue_trial(read_jsonl(first / "trials.jsonl")[0]["candidate"])
    job = broker.next()
    assert job is not None and broker.duplicates == 0


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        compose([*SMOKE, *overrides])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_other_space_refused_through_cli(first: Path, tmp_path: Path) -> None:
    proc = hwnas(*SMOKE, "n_trials=1", f"run_dir={tmp_path / 'x'}", f"warm_start={first}", "space.widths=[8]", timeout=120)
    assert proc.returncode == 2, output_of(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hwnas: error: warm_start:") and "space.widths" in lines[0], lines
    assert not (tmp_path / "x").exists()


def test_bad_warm_start_folders_refused(first: Path, tmp_path: Path) -> None:
    run = f"run_dir={tmp_path / 'new'}"
    assert "is not a folder" in _refused(run, f"warm_start={tmp_path / 'absent'}")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.yaml").write_text("just: [a, list")
    (garbage / "trials.jsonl").write_text("nonsense\n")
    assert "cannot be read" in _refused(run, f"warm_start={garbage}")
    # A config whose space is equal but whose trial log is garbage.
    bad_log = tmp_path / "bad_log"
    shutil.copytree(first, bad_log)
    (bad_log / "trials.jsonl").write_text("{\"number\": 0}\nnot json\n{}\n")
    assert "is not a trial record" in _refused(run, f"warm_start={bad_log}")
    # A candidate the space would never propose (tampered), a missing objective, a foreign target.
    tampered = tmp_path / "tampered"
    shutil.copytree(first, tampered)
    rows = read_jsonl(first / "trials.jsonl")
    rows[0]["candidate"]["stage1.width"] = 999
    (tampered / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _refused(run, f"warm_start={tampered}")
    assert "stage1.width=999 is not a candidate of this space" in message, message
    rows = read_jsonl(first / "trials.jsonl")
    for r in rows:
        r["metrics"].pop("latency_ms")
    (tampered / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "no finite latency_ms" in _refused(run, f"warm_start={tampered}")
    foreign = tmp_path / "foreign"
    shutil.copytree(first, foreign)
    text = (foreign / "config.yaml").read_text().replace("hwnas.spaces.macro_cnn.", "os.system.", 1)
    (foreign / "config.yaml").write_text(text)
    assert "os.system" in _refused(run, f"warm_start={foreign}")
    # A resumed sweep (or an export) does not read it again: its study holds the seeded trials.
    cfg = compose([*SMOKE, f"run_dir={first}", "resume=true", f"warm_start={tmp_path / 'absent'}"])
    assert cfg.warm_start == str(tmp_path / "absent")


def test_init_from_checked_before_any_trial(tmp_path: Path) -> None:
    import torch

    run = f"run_dir={tmp_path / 'new'}"

    def refused(path: Path) -> str:
        # The file is checked when the evaluator is built, before the run folder or any trial.
        from hwnas.search.experiment import build_experiment

        cfg = compose([*SMOKE, run, f"evaluator.init_from={path}"])
        with pytest.raises(ConfigError) as info:
            build_experiment(cfg)
        message = str(info.value)
        assert message.startswith("evaluator.init_from:") and "\n" not in message, message
        return message

    assert "is not a file" in refused(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    assert "is not a safetensors file" in refused(tmp_path / "bad.safetensors")

    torch.save({"model": Payload()}, tmp_path / "pickled.pt")
    assert "weights_only=True" in refused(tmp_path / "pickled.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": Payload()}))
    assert "weights_only=True" in refused(tmp_path / "raw.pkl")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    assert "not a tensor" in refused(tmp_path / "empty.pt")
    # A plain torch state_dict (and one under a state_dict key) is accepted.
    from hwnas.search.experiment import build_experiment

    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "ok.pt")
    built = build_experiment(compose([*SMOKE, run, f"evaluator.init_from={tmp_path / 'ok.pt'}"]))
    assert built.sweep.evaluator.init_from == str((tmp_path / "ok.pt").resolve())
    with pytest.raises(ConfigError, match="^evaluator.init_strict: 'maybe' is not allowed"):
        build_experiment(compose([*SMOKE, run, "evaluator.init_strict=maybe"]))


def test_init_policies_on_networks(tmp_path: Path) -> None:
    """Unit level: what fits is loaded (all of a file of the same network); strict refuses the first key
    that does not fit, naming both shapes."""
    import torch
    from safetensors.torch import save_file

    from hwnas.evaluators.init_weights import load_init

    space = instantiate(compose(list(SMOKE)).space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"n_stages": 1, "stage1.width": 8})
    small = space.suggest(study.ask())
    wide = {**small, "stage1.width": 16}
    src = space.build(small, (1, 16, 16), 4)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))

    same = space.build(small, (1, 16, 16), 4)
    metrics = load_init(same, path, strict=True)
    assert metrics == {"init_loaded_tensors": float(len(src.state_dict())), "init_skipped_tensors": 0.0}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), same.state_dict().values(), strict=True))

    other = space.build(wide, (1, 16, 16), 4)
    metrics = load_init(other, path)
    assert 0 <= metrics["init_loaded_tensors"] < len(src.state_dict())
    assert metrics["init_loaded_tensors"] + metrics["init_skipped_tensors"] == len(src.state_dict())
    with pytest.raises(ValueError) as info:
        load_init(space.build(wide, (1, 16, 16), 4), path, strict=True)
    message = str(info.value)
    assert message.startswith("evaluator.init_from:") and "in small.safetensors and" in message and "\n" not in message
    assert "shape (" in message


def test_defaults_are_off() -> None:
    # warm_start is a top-level key (the study's history, not a sampler argument); both are off by default.
    cfg = compose(list(SMOKE))
    assert cfg.warm_start is None and cfg.evaluator.init_from is None and cfg.evaluator.init_strict is False
