"""What a scheduled sweep reports: trials.csv's `epochs` and statuses, the report's Schedule section, and that a
stopped or rejected trial is never on the front, whatever its figures. Rows are written by hand (the run-level
tests in test_scheduler_runs.py make real ones): a stopped trial here is given a better accuracy and latency
than any finished one, which a real sweep rarely produces, so the front could only exclude it by its status."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from test_report import figure_data, make_rows, make_run, numbers_in

from hwnas.search.report import REPORT_FILE, main
from hwnas.search.schedulers.accounting import schedule_line, schedule_summary
from hwnas.search.trial_log import trials_frame


def scheduled_rows() -> list[dict[str, Any]]:
    """Make_rows' finished trials with train_epochs 6, then two stopped at rung 1 and 2 and one rejected."""
    rows = [r for r in make_rows(8) if r["status"] == "COMPLETE"]
    for r in rows:
        r["metrics"]["train_epochs"] = 6.0
    n = len(rows)
    best = {"latency_ms": 0.001, "model_bytes": 900.0, "params": 100, "train_epochs_full": 6.0}
    rows.append({"number": n, "status": "STOPPED", "arch_id": "s1", "net_id": "s1", "epochs": 1,
                 "candidate": {"width": 8, "quant": "fp32", "block": "ir"}, "feasible": False, "error": None,
                 "metrics": {**best, "rung_val_accuracy": 0.99}, "artifact": None, "node": "local"})
    rows.append({"number": n + 1, "status": "STOPPED", "arch_id": "s2", "net_id": "s2", "epochs": 2,
                 "candidate": {"width": 16, "quant": "int8", "block": "conv"}, "feasible": False, "error": None,
                 "metrics": {**best, "rung_val_accuracy": 0.98}, "artifact": None, "node": "local"})
    rows.append({"number": n + 2, "status": "REJECTED", "arch_id": "r1", "net_id": "r1", "epochs": 0,
                 "candidate": {"width": 32, "quant": "fp32", "block": "conv"}, "feasible": False,
                 "error": "latency_ms 0.2 over the budget 0.05 before training",
                 "metrics": {"latency_ms": 0.2, "model_bytes": 50000.0, "train_epochs_full": 6.0},
                 "artifact": None, "node": "local"})
    return rows


def test_summary_counts_epochs_stops_per_rung_and_rejections() -> None:
    rows = scheduled_rows()
    s = schedule_summary(rows)
    finished = sum(r["status"] == "COMPLETE" for r in rows)
    assert s["epochs"] == 6 * finished + 1 + 2 + 0
    assert s["epochs_full"] == 6 * (finished + 3)
    assert s["stopped"] == {1: 1, 2: 1} and s["rejected"] == 1
    assert abs(s["saved_share"] - (1 - s["epochs"] / s["epochs_full"])) < 1e-12
    line = schedule_line(rows)
    assert "stopped 1@1 1@2" in line and "rejected 1" in line
    assert f"epochs {6 * finished + 3} of {6 * (finished + 3)}" in line


def test_trials_csv_has_epochs_and_statuses_and_drops_epochs_when_nothing_trains() -> None:
    rows = scheduled_rows()
    frame = trials_frame(rows, first=["val_accuracy", "latency_ms"])
    by_number = frame.set_index("number")
    assert list(frame.columns[:9]) == ["number", "status", "arch_id", "net_id", "feasible", "pareto",
                                      "val_accuracy", "latency_ms", "epochs"]  # objectives stay right after identity
    stopped = [r["number"] for r in rows if r["status"] == "STOPPED"]
    assert by_number.loc[stopped, "epochs"].tolist() == [1, 2]
    assert by_number.loc[rows[-1]["number"], "epochs"] == 0 and by_number.loc[rows[-1]["number"], "status"] == "REJECTED"
    assert (by_number.loc[[r["number"] for r in rows if r["status"] == "COMPLETE"], "epochs"] == 6).all()
    assert str(frame["epochs"].dtype) == "Int64"  # epochs are counts, not floats
    # A rejected trial's accuracy is unknown: the column is empty there (the placeholder lives only in the study).
    assert frame.set_index("number")["val_accuracy"].isna().loc[rows[-1]["number"]]
    table = [{k: v for k, v in r.items() if k != "epochs"} for r in make_rows(3) if r["status"] == "COMPLETE"]
    assert "epochs" not in trials_frame(table).columns  # a table lookup trains nothing


def test_report_schedule_section_and_front_leave_out_stopped_and_rejected(tmp_path: Path) -> None:
    rows = scheduled_rows()
    run_dir = make_run(tmp_path / "run", rows, journal=False)
    assert main([f"run_dir={run_dir}"]) == 0
    page = (run_dir / REPORT_FILE).read_text()
    section = re.search(r'<section id="schedule">(.*?)</section>', page, flags=re.S)
    assert section, "no schedule section"
    body = section.group(1)
    s = schedule_summary(rows)
    assert f"Training epochs spent: {s['epochs']:g} of the {s['epochs_full']:g}" in body
    assert "1 at epoch 1, 1 at epoch 2" in body and "Rejected before training" in body
    for r in rows[-3:]:
        assert f"<td>{r['number']}</td>" in body and r["status"] in body
    assert "<td>latency_ms 0.2 over the budget 0.05 before training</td>" in body  # why it was ended
    complete = {r["number"] for r in rows if r["status"] == "COMPLETE"}
    # The stopped trials' figures dominate every finished trial: only their status keeps them off the front.
    assert numbers_in(page, "fig-front") == complete
    front_points = {n for t in figure_data(page, "fig-front") if "front" in t["name"].lower()
                    for n in t.get("customdata") or []}
    assert front_points and front_points <= complete


def test_schedule_section_without_a_budget_says_none_could_be_rejected(tmp_path: Path) -> None:
    rows = [r for r in scheduled_rows() if r["status"] != "REJECTED"]
    run_dir = make_run(tmp_path / "run", rows, journal=False)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("  latency_budget_ms: 0.05\n", "  latency_budget_ms: null\n"))
    assert main([f"run_dir={run_dir}"]) == 0
    body = re.search(r'<section id="schedule">(.*?)</section>', (run_dir / REPORT_FILE).read_text(), flags=re.S)
    assert body, "no schedule section"
    assert "No budget, so none rejected before training." in body.group(1)
    assert "over budget" not in body.group(1) and "1 at epoch 1, 1 at epoch 2" in body.group(1)
