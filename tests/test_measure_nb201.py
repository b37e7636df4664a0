"""scripts/measure_nb201_latency.py: its record keeping (torn lines, shards) and one real measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from script_module import load_script

SETTINGS = {"seed": 0}
IDENTITY = "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
ALSO_IDENTITY = "|none~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|"  # conv on a zero node
CONV = "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|"




def test_torn_lines_are_skipped_then_ended(tmp_path: Path) -> None:
    m = load_script("measure_nb201_latency")
    path = tmp_path / "m.jsonl"
    good = json.dumps({"unique": "a", "settings": SETTINGS, "latency_ms": 1.0})
    path.write_text(good + "\n" + '{"unique": "b", "sett')  # a writer killed mid-line
    assert set(m.load_measurements(path, SETTINGS)) == {"a"}
    m.end_torn_line(path)
    with path.open("a") as f:
        f.write(json.dumps({"unique": "c", "settings": SETTINGS, "latency_ms": 2.0}) + "\n")
    assert set(m.load_measurements(path, SETTINGS)) == {"a", "c"}  # the next record is not glued to the torn one
    m.end_torn_line(path)
    assert path.read_text().count("\n") == 3  # a file that ends well is left alone


def test_other_settings_are_refused(tmp_path: Path) -> None:
    m = load_script("measure_nb201_latency")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"unique": "a", "settings": {"seed": 1}}) + "\n")
    with pytest.raises(ValueError, match="measured with"):
        m.load_measurements(path, SETTINGS)


def test_isomorphic_cells_are_timed_once_on_the_cheapest_spelling() -> None:
    m = load_script("measure_nb201_latency")
    frame = pd.DataFrame({"arch": [ALSO_IDENTITY, IDENTITY, CONV]})
    networks = m.network_order(frame, seed=0)
    assert sorted(a for _, a in networks) == sorted([IDENTITY, CONV])  # the dead conv is not timed


def test_two_shards_share_one_file_and_the_last_writes_the_table(tmp_path: Path) -> None:
    m = load_script("measure_nb201_latency")
    table = tmp_path / "acc.csv"
    pd.DataFrame({"arch": [IDENTITY, ALSO_IDENTITY, CONV], "cifar10-val": [70.0, 71.0, 80.0]}).to_csv(table, index=False)
    out = tmp_path / "lat.csv"
    common = [str(table), "--out", str(out), "--warmup", "1", "--repeats", "3", "--rounds", "1", "--min-cpu-share", "0.01"]
    assert m.main([*common, "--shard", "0/2"]) == 0
    first = pd.read_csv(out)
    assert m.main([*common, "--shard", "1/2", "--resume"]) == 0
    whole = pd.read_csv(out)
    assert len(first) in (1, 2) and len(whole) == 3  # shard 0 measured one network, shard 1 the other
    assert (whole["latency_ms"] > 0).all()
    rows = whole.set_index("arch")
    assert rows.loc[IDENTITY, "latency_ms"] == rows.loc[ALSO_IDENTITY, "latency_ms"]  # one network, one timing
    assert len(m.load_measurements(m.measurements_path(out), json.loads(m.measurements_path(out).read_text().splitlines()[0])["settings"])) == 2
