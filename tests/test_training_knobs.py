"""Training hyperparameters as searchable knobs (issue 13, item 5): `space.train`.

The space samples `train.lr`, `train.weight_decay`, `train.batch_size`, `train.optimizer`,
`train.momentum` (sgd only), `train.label_smoothing` and `train.epochs`; the pipeline evaluator trains
with them over its defaults; they show in trials.csv and as MLflow params; a resumed sweep keeps them;
bad configs are refused in one line before any work. Nothing is mocked: each value is checked where it
acts (the loss, the optimizer, Lightning's count of optimizer steps).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from conftest import (
    ROOT,
    hwnas,
    kill_after_first_trial_then_resume,
    mlflow_runs,
    output_of,
)

from hwnas.spaces.candidate import arch_id, net_id
from hwnas.spaces.macro_cnn import MacroCNNSpace
from hwnas.spaces.training import TrainingKnobs, training_values

CONF = ROOT / "conf"
TRAIN_KEYS = ("train.lr", "train.weight_decay", "train.batch_size", "train.optimizer", "train.label_smoothing",
              "train.epochs")
FULL = {
    "lr": {"low": 1e-4, "high": 0.1, "log": True},
    "weight_decay": [0, 1e-4, 1e-3],
    "batch_size": [16, 32, 64],
    "optimizer": ["adam", "sgd", "adamw"],
    "momentum": [0.8, 0.9],
    "label_smoothing": [0.0, 0.1],
    "epochs": {"low": 1, "high": 3},
}


def macro_space(**overrides: Any) -> MacroCNNSpace:
    conf = yaml.safe_load((CONF / "space" / "macro_cnn.yaml").read_text())
    conf.pop("_target_")
    conf.update(overrides)
    return MacroCNNSpace(**conf)


# ---- the space: sampling, checks and identity (no torch) ----


def test_off_by_default() -> None:
    space = macro_space()
    assert yaml.safe_load((CONF / "space" / "macro_cnn.yaml").read_text())["train"] is None
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    candidate = space.suggest(trial)
    assert not [k for k in candidate if k.startswith("train.")]
    with pytest.raises(ValueError, match=r"^candidate key 'train.lr' is not a parameter here; allowed: none"):
        space.candidate_from_params({**candidate, "train.lr": 0.01})


def test_knobs_sampled_conditionally_and_round_trip() -> None:
    space = macro_space(train=FULL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    optimizers = set()
    for _ in range(40):
        trial = study.ask()
        candidate = space.suggest(trial)
        assert candidate == trial.params
        assert set(TRAIN_KEYS) <= set(candidate)
        # momentum only where it acts: with sgd
        assert ("train.momentum" in candidate) == (candidate["train.optimizer"] == "sgd")
        assert 1e-4 <= candidate["train.lr"] <= 0.1 and candidate["train.epochs"] in (1, 2, 3)
        assert candidate["train.weight_decay"] in (0.0, 1e-4, 1e-3) and isinstance(candidate["train.weight_decay"], float)
        assert space.candidate_from_params(trial.params) == candidate
        # build and name ignore the training keys: the same network with or without them
        assert space.name(candidate) == space.name({k: v for k, v in candidate.items() if not k.startswith("train.")})
        optimizers.add(candidate["train.optimizer"])
        study.tell(trial, 0.0)
    assert optimizers == {"adam", "sgd", "adamw"}
    lr = study.trials[0].distributions["train.lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    assert isinstance(study.trials[0].distributions["train.epochs"], optuna.distributions.IntDistribution)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"lr": {"low": -1, "high": 0.1}}, "space.train.lr.low: -1 is not allowed; allowed: a finite float > 0"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "space.train.lr: low 0.1 >= high 0.01; allowed: low < high"),
        ({"lr": {"low": 0.01, "high": 0.1, "step": 2}}, "space.train.lr: "),
        ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, "space.train.weight_decay.low: 0.0 with log: true"),
        ({"batch_size": [32, 0]}, "space.train.batch_size: 0 is not allowed; allowed: an int >= 1"),
        ({"batch_size": [32, 32]}, "space.train.batch_size: 32 is listed twice"),
        ({"optimizer": ["adam", "rmsprop"]}, "space.train.optimizer: 'rmsprop' is not allowed; allowed: adam, sgd, adamw"),
        ({"optimizer": {"low": 0, "high": 1}}, "space.train.optimizer: a range is not allowed"),
        ({"label_smoothing": [0.0, 1.0]}, "space.train.label_smoothing: 1.0 is not allowed; allowed: a float 0 <= s < 1"),
        ({"epochs": [1, 2.5]}, "space.train.epochs: 2.5 is not allowed; allowed: an int >= 1"),
        ({"epochs": []}, "space.train.epochs: [] is empty"),
        ({"epochs": "3"}, "space.train.epochs: '3' is not allowed"),
        ({"momentum": [0.9]}, "space.train.momentum: needs train.optimizer with sgd among its choices"),
        ({"optimizer": ["adam"], "momentum": [0.9]}, "space.train.momentum: needs train.optimizer with sgd"),
        ({"dropout": [0.1]}, "space.train.dropout: not a training knob; allowed: lr, weight_decay, batch_size"),
        ([0.1], "space.train: [0.1] is not a mapping"),
    ],
)
def test_bad_train_config_refused_in_one_line(train: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        macro_space(train=train)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text and "; allowed: " in text, text


def test_candidate_values_checked() -> None:
    space = macro_space(train=FULL)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2)).ask()
    good = space.suggest(trial)
    bad = [
        ({**good, "train.lr": 0.5}, "candidate train.lr=0.5 is out of range; allowed: 0.0001..0.1"),
        ({**good, "train.batch_size": 48}, "candidate train.batch_size=48 is not a choice"),
        ({k: v for k, v in good.items() if k != "train.lr"}, "candidate key 'train.lr' is missing"),
        ({**good, "train.optimizer": "adam", "train.momentum": 0.9}, "candidate key 'train.momentum' is not a parameter here"),
    ]
    for params, message in bad:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            space.candidate_from_params(params)
    # What the evaluator reads from a (possibly untrusted) record: checked the same way, one line.
    assert training_values({"n_stages": 1, "train.lr": 0.01, "train.batch_size": 8}) == {"lr": 0.01, "batch_size": 8}
    for params, message in [({"train.lr": -1.0}, "candidate train.lr: -1.0 is not allowed"),
                            ({"train.optimizer": "lamb"}, "candidate train.optimizer: 'lamb' is not allowed"),
                            ({"train.momentum": 0.9}, "candidate train.momentum: set without train.optimizer=sgd"),
                            ({"train.nesterov": True}, "candidate train.nesterov: 'nesterov' is not a training knob")]:
        with pytest.raises(ValueError) as caught:
            training_values(params)
        assert str(caught.value).startswith(message), str(caught.value)


def test_ids_and_seed_keep_training_apart() -> None:
    from test_pipeline import make_evaluator

    evaluator = make_evaluator(space=macro_space(train=FULL))
    base = {"n_stages": 1, "stage1.depth": 1, "stage1.width": 8, "stage1.kernel": 3, "stage1.block": "conv",
            "prune_ratio": 0.0, "quant": "fp32", "train.lr": 0.01, "train.optimizer": "adam"}
    other_lr = {**base, "train.lr": 0.02}
    int8 = {**base, "quant": "int8"}
    # Trained differently -> different weights: both ids differ.
    assert arch_id(base) != arch_id(other_lr) and net_id(base) != net_id(other_lr)
    # Compression of one trained network: the same net_id (pairs fp32 with int8), as without the knobs.
    assert net_id(base) == net_id(int8) and arch_id(base) != arch_id(int8)
    # The same initial weights and batch order for every training of one network (common random
    # numbers), and a candidate without knobs seeds as before.
    plain = {k: v for k, v in base.items() if not k.startswith("train.")}
    assert evaluator.trial_seed(base) == evaluator.trial_seed(other_lr) == evaluator.trial_seed(plain)
    assert evaluator.trial_seed(plain) == (evaluator.seed * 1_000_003 + int(net_id(plain), 16)) % (2**31 - 1)
    # The candidate's values over the evaluator's defaults; the rest stays the evaluator's.
    settings = evaluator.training_settings({**base, "train.label_smoothing": 0.1})
    assert settings == {"epochs": evaluator.epochs, "lr": 0.01, "optimizer": "adam", "weight_decay": evaluator.weight_decay,
                        "momentum": 0.9, "label_smoothing": 0.1, "batch_size": None}
    assert evaluator.training_settings(plain)["lr"] == evaluator.lr
    with pytest.raises(ValueError, match=r"^candidate train\.batch_size: 0 is not allowed"):
        evaluator.evaluate({**base, "train.batch_size": 0}, Path("/nonexistent-never-written"))


def test_knobs_object_alone() -> None:
    assert not TrainingKnobs(None) and not TrainingKnobs({}) and not TrainingKnobs({"lr": None})
    knobs = TrainingKnobs({"optimizer": ["sgd", "adam"], "momentum": {"low": 0.5, "high": 0.95}})
    assert knobs.names({"train.optimizer": "sgd"}) == ["train.optimizer", "train.momentum"]
    assert knobs.names({"train.optimizer": "adam"}) == ["train.optimizer"]
    assert knobs.decisions() == {"train.optimizer": ["sgd", "adam"]}


# ---- each value reaches training (torch, in process) ----


def _data(batch_size: int = 64) -> Any:
    from hwnas.evaluators.data import SyntheticData

    data = SyntheticData(n_samples=200, num_classes=4, resolution=8, channels=1, val_fraction=0.2, test_fraction=0.2,
                         batch_size=batch_size, seed=0, noise=0.5)
    data.setup()
    return data


def _net() -> Any:
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def test_batch_size_and_epochs_change_the_optimizer_steps() -> None:
    from hwnas.evaluators.train import fit

    data = _data(batch_size=64)
    n_train = len(data.arrays("train")[1])
    counted = {}
    for batch_size, epochs in [(None, 1), (8, 1), (8, 2), (50, 3)]:
        steps: list[int] = []
        fit(_net(), data, epochs=epochs, lr=0.01, optimizer="adam", weight_decay=0.0, accelerator="cpu", seed=0,
            compute_slot=False, batch_size=batch_size, steps=steps)
        counted[(batch_size, epochs)] = steps[0]
    assert counted == {(None, 1): math.ceil(n_train / 64), (8, 1): math.ceil(n_train / 8), (8, 2): 2 * math.ceil(n_train / 8),
                       (50, 3): 3 * math.ceil(n_train / 50)}
    # Rebatching keeps the items and their seeded order: the same samples, only cut differently.
    from hwnas.evaluators.train import SplitsDataModule

    def order(loader: Any) -> list[int]:  # the item order the batch sampler hands out
        return [int(i) for batch in loader.sampler for i in batch]

    plain = SplitsDataModule(data, seed=3).train_dataloader()
    again = SplitsDataModule(data, seed=3, batch_size=7).train_dataloader()
    assert order(plain) == order(again) and sorted(order(again)) == list(range(n_train))
    assert [len(y) for _, y in again] == [7] * (n_train // 7) + ([n_train % 7] if n_train % 7 else [])


def test_label_smoothing_changes_the_loss_and_optimizer_settings_reach_the_optimizer() -> None:
    import torch
    import torch.nn.functional as F

    from hwnas.evaluators.train import ClassifierModule

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    net = _net()
    plain = ClassifierModule(net, lr=0.01, optimizer="adam", weight_decay=0.0, epochs=1).training_step((x, y), 0)
    smoothed = ClassifierModule(net, lr=0.01, optimizer="adam", weight_decay=0.0, epochs=1,
                                label_smoothing=0.2).training_step((x, y), 0)
    assert torch.isclose(plain, F.cross_entropy(net(x), y)) and torch.isclose(smoothed, F.cross_entropy(net(x), y, label_smoothing=0.2))
    assert not torch.isclose(plain, smoothed)
    for name, kind in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]:
        module = ClassifierModule(net, lr=0.037, optimizer=name, weight_decay=1e-3, epochs=2, momentum=0.8)
        opt = module.configure_optimizers()["optimizer"]
        assert type(opt) is kind
        group = opt.param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (0.037, 1e-3)
        if name == "sgd":
            assert group["momentum"] == 0.8 and group["nesterov"]


def test_pipeline_trains_with_the_candidates_values(tmp_path: Path) -> None:
    """A whole trial with the knobs: the steps it took follow train.batch_size and train.epochs, and the
    settings it used are the candidate's (defaults where it has none)."""
    from test_pipeline import make_evaluator

    space = macro_space(n_stages=[1], depths=[1], widths=[8], train={"batch_size": [16, 64], "epochs": [1, 2]})
    evaluator = make_evaluator(space=space, epochs=3)
    evaluator.data.setup()
    n_train = len(evaluator.data.arrays("train")[1])
    base = {"n_stages": 1, "stage1.depth": 1, "stage1.width": 8, "stage1.kernel": 3, "stage1.block": "conv",
            "prune_ratio": 0.0, "quant": "fp32"}
    small = evaluator.evaluate({**base, "train.batch_size": 16, "train.epochs": 2}, tmp_path / "a")
    assert small.info["train_steps"] == 2 * math.ceil(n_train / 16)
    assert small.info["training"]["batch_size"] == 16 and small.info["training"]["lr"] == evaluator.lr
    default = evaluator.evaluate(base, tmp_path / "b")  # no knobs: the evaluator's epochs and the data's batches
    assert default.info["train_steps"] == 3 * math.ceil(n_train / 32)
    # Final training: the candidate's batch size, the export's epochs.
    final = evaluator.retrain({**base, "train.batch_size": 64, "train.epochs": 2}, tmp_path / "c", epochs=1)
    n_trainval = n_train + len(evaluator.data.arrays("val")[1])
    assert final.info["train_steps"] == math.ceil(n_trainval / 64)
    assert final.info["training"]["epochs"] == 1 and final.info["training"]["batch_size"] == 64


# ---- through the CLI: recorded, refused, resumed ----


def test_bad_train_config_refused_through_the_cli(tmp_path: Path) -> None:
    for override, message in [
        ("space.train.lr.low=-1", "space.train.lr.low: -1"),
        ("space.train.optimizer=[adam,rmsprop]", "space.train.optimizer: 'rmsprop' is not allowed; allowed: adam, sgd, adamw"),
    ]:
        proc = hwnas("experiment=compress_all", "runner=local", "tracking.enabled=false", override,
                     f"run_dir={tmp_path / 'run'}", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, output_of(proc)
        assert len(lines) == 1 and lines[0].startswith(f"hwnas: error: {message}"), proc.stderr
        assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_compress_all_records_the_knobs_and_resumes_with_them(tmp_path: Path) -> None:
    """experiment=compress_all: every train.* knob in trials.csv and in each MLflow child run's params;
    killed after its first trial and resumed, the sweep finishes with the same knobs, the trials
    recorded before the kill unchanged."""
    n = 4
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["experiment=compress_all", "runner=local", f"n_trials={n}", f"run_dir={run_dir}", f"tracking.uri={uri}",
            f"hardware.cache={tmp_path / 'latency.sqlite'}"]
    before, rows = kill_after_first_trial_then_resume(args, run_dir, n)
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == n and set(TRAIN_KEYS) <= set(trials.columns)
    assert (trials["status"] == "COMPLETE").all(), trials[["number", "status", "error"]]
    for key in TRAIN_KEYS:
        assert trials[key].notna().all(), key
    assert trials["train.batch_size"].isin([16, 64]).all() and trials["train.epochs"].isin([1, 2]).all()
    assert trials["train.lr"].between(1e-3, 3e-2).all()
    # momentum exactly where the optimizer is sgd
    assert (trials["train.momentum"].notna() == (trials["train.optimizer"] == "sgd")).all()

    # The resumed study samples the same parameters, with the same distributions, as before the kill.
    from hwnas.search.sweep_state import SweepState, journal_storage

    state = SweepState.load(run_dir)
    study = optuna.load_study(study_name=state.study_name, storage=journal_storage(run_dir))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    lrs = {str(t.distributions["train.lr"]) for t in finished}
    assert len(lrs) == 1 and "log=True" in lrs.pop()
    by_number = {r["number"]: r for r in rows}
    # A trial cut short by the kill is queued again with its own params, knobs included (one killed
    # before its last knob, train.epochs, was sampled is queued with what it had: the rest is sampled anew).
    from hwnas.search.study_record import INTERRUPTED

    again = {arch_id(t.params) for t in study.trials if INTERRUPTED in t.user_attrs and "train.epochs" in t.params}
    assert again <= {r["arch_id"] for r in rows[len(before):]}
    for t in finished:
        if t.number in by_number:
            assert {k: v for k, v in t.params.items() if k.startswith("train.")} == {
                k: v for k, v in by_number[t.number]["candidate"].items() if k.startswith("train.")}

    # MLflow: every child run carries the knobs as params, under the same names.
    _, children = mlflow_runs(uri, "hwnas-compress_all")
    ended = [c for c in children if c.info.status in ("FINISHED", "FAILED")]
    assert len(ended) == n
    for c in ended:
        row = by_number[int(c.data.tags["trial"])]
        assert set(TRAIN_KEYS) <= set(c.data.params)
        assert float(c.data.params["train.lr"]) == pytest.approx(row["candidate"]["train.lr"])
        assert c.data.params["train.optimizer"] == row["candidate"]["train.optimizer"]


def test_nb201_space_takes_the_knobs_too() -> None:
    from hwnas.spaces.nb201 import NB201Space

    conf = yaml.safe_load((CONF / "space" / "nb201.yaml").read_text())
    conf.pop("_target_")
    assert conf["train"] is None
    space = NB201Space(**{**conf, "train": {"lr": [0.01, 0.1], "optimizer": ["sgd", "adam"], "momentum": [0.9]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        candidate = space.suggest(trial)
        assert candidate == trial.params and space.candidate_from_params(trial.params) == candidate
        assert {"train.lr", "train.optimizer"} <= set(candidate)
        assert ("train.momentum" in candidate) == (candidate["train.optimizer"] == "sgd")
        study.tell(trial, 0.0)
    cell = {k: v for k, v in candidate.items() if not k.startswith("train.")}
    assert space.name(candidate) == space.name(cell)
    # build ignores the knobs: the same network, parameter for parameter
    built, plain = space.build(candidate, (3, 8, 8), 10), space.build(cell, (3, 8, 8), 10)
    assert [tuple(p.shape) for p in built.parameters()] == [tuple(p.shape) for p in plain.parameters()]
    with pytest.raises(ValueError, match=r"^space\.train\.lr: 0 is not allowed"):
        NB201Space(**{**conf, "train": {"lr": [0, 0.1]}})
