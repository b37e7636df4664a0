"""TabularEvaluator: table look-ups, one-line errors, and a whole `hwnas experiment=nb201_tabular` sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import NB201_METRICS, NB201_OPS, make_nb201_table

from hwnas.evaluators.tabular import TabularEvaluator
from hwnas.search.pareto import non_dominated_mask
from hwnas.spaces.nb201 import EDGE_KEYS, NB201Space, from_arch_string, to_arch_string

ROOT = Path(__file__).resolve().parent.parent
OPS = list(NB201_OPS)  # 2 ops on 6 edges: 64 cells
METRICS = NB201_METRICS
make_table = make_nb201_table


def space() -> NB201Space:
    return NB201Space(ops=OPS, C=4, N=1, prune_ratios=[0.0], quant=["fp32"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_lookup_returns_the_rows_numbers(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"t{suffix}"
    make_table(path)
    frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)  # the numbers as stored
    ev = TabularEvaluator(str(path), "arch", space())
    assert ev.metric_names == ("acc", "latency_ms", "params")
    assert len(ev) == 64
    for _, row in frame.sample(10, random_state=1).iterrows():
        result = ev.evaluate(from_arch_string(row["arch"]), tmp_path)
        assert result.artifact is None
        assert result.metrics == {"acc": row["acc"], "latency_ms": row["latency_ms"], "params": float(row["params"])}
        assert all(isinstance(v, float) for v in result.metrics.values())


def test_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError) as err:
        TabularEvaluator(str(path), "arch", space())
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_training_knobs_with_a_table_are_refused(tmp_path: Path) -> None:
    make_table(tmp_path / "t.csv")
    knobs = NB201Space(ops=OPS, C=4, N=1, prune_ratios=[0.0], quant=["fp32"], train={"lr": [0.01, 0.1]})
    with pytest.raises(ValueError, match=r"^space\.train: .*allowed: space\.train=null and space\.distill=null with evaluator=tabular$"):
        TabularEvaluator(str(tmp_path / "t.csv"), "arch", knobs)


def test_unknown_suffix_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("arch,acc\n")
    with pytest.raises(ValueError, match=r"suffix '\.txt'.*allowed: \.csv"):
        TabularEvaluator(str(tmp_path / "t.txt"), "arch", space())


def test_missing_key_column_names_it_and_lists_columns(tmp_path: Path) -> None:
    make_table(tmp_path / "t.csv")
    with pytest.raises(ValueError) as err:
        TabularEvaluator(str(tmp_path / "t.csv"), "cell", space())
    text = str(err.value)
    assert "'cell'" in text and "arch, acc, latency_ms, params, note" in text and "\n" not in text


def test_unknown_arch_names_it(tmp_path: Path) -> None:
    frame = make_table(tmp_path / "t.csv", drop=1)  # the all-conv cell is missing
    ev = TabularEvaluator(str(tmp_path / "t.csv"), "arch", space())
    missing = {k: "nor_conv_3x3" for k in EDGE_KEYS}
    assert to_arch_string(missing) not in set(frame["arch"])
    with pytest.raises(KeyError) as err:
        ev.evaluate(missing, tmp_path)
    assert to_arch_string(missing) in str(err.value) and "\n" not in str(err.value)


def test_objective_not_in_table_is_rejected(tmp_path: Path) -> None:
    make_table(tmp_path / "t.csv")

    class Names:
        names = ("acc", "energy_mj")

    with pytest.raises(ValueError, match="'energy_mj' is not a numeric column.*allowed: acc, latency_ms, params"):
        TabularEvaluator(str(tmp_path / "t.csv"), "arch", space(), Names())


def hwnas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from hwnas.search.cli import main; sys.exit(main())", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_cli_sweep_runs_to_completion(tmp_path: Path) -> None:
    make_table(tmp_path / "t.csv")
    frame = pd.read_csv(tmp_path / "t.csv")
    run_dir = tmp_path / "run"
    proc = hwnas(
        "experiment=nb201_tabular", f"space.ops=[{','.join(OPS)}]", f"evaluator.table={tmp_path / 't.csv'}",
        METRICS, "n_trials=30", f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 30 and (trials["status"] == "COMPLETE").all()
    assert trials["arch_id"].is_unique  # duplicates were answered from the record, not re-run
    by_arch = frame.set_index("arch")
    for _, t in trials.iterrows():
        arch = to_arch_string({k: t[k] for k in EDGE_KEYS})
        assert (t["acc"], t["latency_ms"]) == (by_arch.loc[arch, "acc"], by_arch.loc[arch, "latency_ms"])
    front = trials[non_dominated_mask(trials[["acc", "latency_ms"]].to_numpy(), ["max", "min"])]
    pareto = pd.read_csv(run_dir / "pareto.csv")
    assert sorted(pareto["number"]) == sorted(front["number"])
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    assert card["candidate"]["trial"] in set(pareto["number"]) and "files" not in card  # a table has no model file
    assert not (run_dir / "export" / "model.onnx").exists()


def test_cli_missing_table_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.csv"
    proc = hwnas("experiment=nb201_tabular", f"evaluator.table={path}", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hwnas: error:")]
    assert len(errors) == 1 and str(path) in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_past_deadline_raises_timeout(tmp_path: Path) -> None:
    make_table(tmp_path / "t.csv")
    ev = TabularEvaluator(str(tmp_path / "t.csv"), "arch", space())
    cell = {k: "skip_connect" for k in EDGE_KEYS}
    assert ev.evaluate(cell, tmp_path, deadline=time.monotonic() + 60).metrics == ev.lookup(to_arch_string(cell))
    with pytest.raises(TimeoutError):
        ev.evaluate(cell, tmp_path, deadline=time.monotonic() - 1)
