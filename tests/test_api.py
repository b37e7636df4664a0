"""`hwnas.run([...])`: the command as a Python call, with the command's validation raised as ConfigError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tabular import METRICS, OPS, make_table

import hwnas


def test_run_returns_the_sweeps_trials_front_and_export(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    frame = make_table(table)
    run_dir = tmp_path / "run"
    result = hwnas.run([
        "experiment=nb201_tabular", f"space.ops=[{','.join(OPS)}]", f"evaluator.table={table}",
        METRICS, "n_trials=12", f"run_dir={run_dir}",
    ])
    assert result.run_dir == run_dir
    assert len(result.trials) == 12 and set(result.trials["status"]) == {"COMPLETE"}
    # the front is what pareto.csv holds, and each of its accuracies is a row of the table
    assert 1 <= len(result.front) <= 12
    assert set(result.front["number"]) <= set(result.trials["number"])
    assert set(result.front["acc"]) <= set(frame["acc"])
    # a table sweep exports a card but no model file
    assert result.export_dir == run_dir / "export"
    card = json.loads((result.export_dir / "model_card.json").read_text())
    assert card["candidate"]["trial"] in set(result.front["number"])


def test_bad_input_raises_the_commands_one_line_error_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hwnas.ConfigError, match=r"^n_trials: 0 is not allowed; allowed: an integer 1..1000000$"):
        hwnas.run(["n_trials=0"])
    with pytest.raises(hwnas.ConfigError, match=r"^search=nope: unknown choice"):
        hwnas.run(["search=nope"])
    with pytest.raises(TypeError, match="a list of strings"):
        hwnas.run("n_trials=3")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
