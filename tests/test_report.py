"""report.html and hwnas-report: every section, every trial, nothing unescaped, nothing loaded from the
network, any run folder (moved ones too), one-line refusals of bad ones, and ReportWriter's coalescing.

Most run folders here are written by hand (trials.jsonl, config.yaml, sweep.json and a real Optuna
journal): cheap, and they can hold what a sweep rarely produces (hostile text, failures). One real
sweep checks that a moved run folder still reports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import ROOT, hwnas, output_of

from hwnas.search.objectives import Objectives
from hwnas.search.report import REPORT_FILE, SECTIONS, ReportWriter, main, write_report
from hwnas.search.sweep_state import SweepState, journal_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

HOSTILE = "<script>alert('x')</script> & <img src=x onerror=alert(1)>"
CONFIG = """experiment_name: handmade
objective:
  metrics:
  - {name: val_accuracy, mode: max}
  - {name: latency_ms, mode: min}
  latency_budget_ms: 0.05
  budgets: {}
"""
OBJECTIVES = Objectives(("val_accuracy", "latency_ms"), ("max", "min"), {"latency_ms": ("upper", 0.05)})
REPORT_CMD = [str(Path(sys.executable).with_name("hwnas-report"))]


def make_rows(n_complete: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Complete trials (some over the 0.05 ms budget) and two failed ones, one with hostile text."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_complete):
        width = int(rng.choice([8, 16, 32]))
        rows.append({
            "number": i, "status": "COMPLETE", "arch_id": f"a{i:03d}", "net_id": f"n{i:03d}",
            "candidate": {"width": width, "quant": str(rng.choice(["fp32", "int8"])), "block": "ir" if i % 2 else "conv"},
            "metrics": {"val_accuracy": float(rng.uniform(0.3, 0.9)), "latency_ms": float(rng.uniform(0.005, 0.08)),
                        "params": int(rng.integers(1000, 9000)), "train_s": 0.1},
            "feasible": True, "error": None, "artifact": f"trials/{i:04d}/model.onnx", "node": "local",
        })
    n = n_complete
    rows.append({"number": n, "status": "FAILED", "arch_id": "bad", "candidate": {"width": 8, "note": HOSTILE},
                 "metrics": {}, "feasible": False, "error": f"RuntimeError: {HOSTILE}", "artifact": None, "node": "w1"})
    rows.append({"number": n + 1, "status": "FAILED", "arch_id": "bad2", "candidate": {"width": 16},
                 "metrics": {}, "feasible": False, "error": "MemoryError: out of memory", "artifact": None, "node": "w2"})
    return rows


def make_journal(run_dir: Path, rows: list[dict[str, Any]], study_name: str = "handmade") -> None:
    """The sweep's Optuna journal with the complete rows told, as the broker records them."""
    study = optuna.create_study(study_name=study_name, storage=journal_storage(run_dir),
                                directions=["maximize", "minimize"])
    for r in rows:
        trial = study.ask()
        trial.suggest_categorical("width", [8, 16, 32])
        if r["status"] == "COMPLETE":
            trial.suggest_categorical("quant", ["fp32", "int8"])
            study.tell(trial, [r["metrics"]["val_accuracy"], r["metrics"]["latency_ms"]])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    SweepState(study_name=study_name, parent_run_id=None).save(run_dir)


def make_run(run_dir: Path, rows: list[dict[str, Any]] | None = None, *, journal: bool = True,
             card: Any = None) -> Path:
    run_dir.mkdir(parents=True)
    rows = make_rows() if rows is None else rows
    (run_dir / "config.yaml").write_text(CONFIG)
    (run_dir / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        if r.get("artifact"):
            (run_dir / r["artifact"]).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / r["artifact"]).write_bytes(b"onnx")
    if journal:
        make_journal(run_dir, rows)
    if card is not None:
        (run_dir / "export").mkdir()
        (run_dir / "export" / "model_card.json").write_text(json.dumps(card))
        (run_dir / "export" / "MODEL_CARD.md").write_text(f"# Model card\n\nlabels: {HOSTILE}\n")
    return run_dir


def figure_data(page: str, div_id: str) -> list[dict[str, Any]]:
    """The traces of the plotly figure drawn into `div_id`, as the page hands them to Plotly.newPlot."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert m, f"no figure {div_id} in the report"
    data, _ = json.JSONDecoder().raw_decode(page, m.end())
    return data


def numbers_in(page: str, div_id: str) -> set[int]:
    return {int(n) for trace in figure_data(page, div_id) for n in trace.get("customdata") or []}


def assert_offline(page: str) -> None:
    """No element loads anything: no src/href to a network address, no external script at all."""
    tags = re.findall(r"<(?:script|link|img|iframe|object|embed|source)\b[^>]*>", page, flags=re.I)
    for tag in tags:
        assert not re.search(r"""(?:src|href|data)\s*=\s*["']?\s*(?:https?:)?//""", tag, flags=re.I), tag
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page.split("<script", 1)[0], flags=re.I)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def run_report(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REPORT_CMD, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---- the page ----


def test_report_has_every_section_trial_and_nothing_unescaped(tmp_path: Path) -> None:
    rows = make_rows()
    card = {"trial": 3, "arch_id": "a003", "candidate": rows[3]["candidate"], "latency_ms": 0.0107,
            "data": {"classes": ["cat", HOSTILE]}, "notes": HOSTILE}
    run_dir = make_run(tmp_path / "run", rows, card=card)
    assert main([f"run_dir={run_dir}"]) == 0
    page = (run_dir / REPORT_FILE).read_text()

    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    complete = {r["number"] for r in rows if r["status"] == "COMPLETE"}
    assert numbers_in(page, "fig-front") == complete  # every complete trial is a point
    traces = {t["name"].split(" (")[0]: t for t in figure_data(page, "fig-front")}
    assert {"trials", "outside budget", "Pareto front", "chosen"} <= set(traces)
    assert traces["chosen"]["customdata"] == [3]
    over = {r["number"] for r in rows if r["status"] == "COMPLETE" and r["metrics"]["latency_ms"] > 0.05}
    assert set(traces["outside budget"]["customdata"]) == over
    hover = " ".join(traces["Pareto front"]["hovertext"])
    assert "µs" in hover and "width=" in hover  # latency read by people (format_ms), the candidate shown
    hv = figure_data(page, "fig-hypervolume")[0]
    assert hv["x"] == sorted(r["number"] for r in rows) and np.all(np.diff(hv["y"]) >= 0) and hv["y"][-1] > 0
    assert figure_data(page, "fig-importance")[0]["type"] == "bar"
    assert page.count("Plotly.newPlot(") == 3

    # untrusted text is escaped everywhere: the failed trial's error, the candidate, the card and its Markdown
    assert "<script>alert" not in page and "<img src=x" not in page
    failed = page.split('<section id="failed">', 1)[1].split("</section>", 1)[0]
    assert "RuntimeError: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;img" in failed
    assert "MemoryError: out of memory" in failed and "Failed trials (2)" in failed
    card_html = page.split('<section id="card">', 1)[1].split("</section>", 1)[0]
    assert "MODEL_CARD.md" in card_html and "labels: &lt;script&gt;" in card_html
    assert '<tr class="chosen"><td>3</td>' in page  # the front table marks the chosen trial
    assert_offline(page)


def test_write_report_leaves_rows_alone_and_marks_front_under_given_objectives(tmp_path: Path) -> None:
    rows = make_rows()
    before = json.dumps(rows, sort_keys=True)
    run_dir = make_run(tmp_path / "run", rows, journal=False)
    loose = Objectives(("val_accuracy", "latency_ms"), ("max", "min"))
    page = write_report(run_dir, loose, rows, importances=False).read_text()
    assert json.dumps(rows, sort_keys=True) == before
    names = {t["name"].split(" (")[0] for t in figure_data(page, "fig-front")}
    assert "outside budget" not in names  # no budget under these objectives
    assert not list(run_dir.glob(".report.html.*"))  # written through a temporary file, replaced at once


def test_importances_say_why_when_there_are_none(tmp_path: Path) -> None:
    no_journal = make_run(tmp_path / "a", make_rows(3), journal=False)
    page = write_report(no_journal, OBJECTIVES, make_rows(3)).read_text()
    assert "no optuna.journal" in page and "fig-importance" not in page
    few = make_run(tmp_path / "b", make_rows(3), journal=True)
    page = write_report(few, OBJECTIVES, make_rows(3)).read_text()
    assert "Too few trials for importances: 3 complete" in page


def test_no_trials_yet(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", [], journal=False)
    assert main([f"run_dir={run_dir}"]) == 0
    page = (run_dir / REPORT_FILE).read_text()
    assert "No complete trial yet" in page and "Plotly.newPlot(" not in page
    assert all(f'<section id="{k}">' in page for k in SECTIONS)


# ---- hwnas-report on a moved run folder ----


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    proc = hwnas("experiment=smoke", "runner=local", "n_trials=3", "search=random", "tracking.enabled=false",
                 "evaluator.epochs=1", f"run_dir={run_dir}")
    assert proc.returncode == 0, output_of(proc)
    return run_dir


def test_moved_run_folder_still_reports(real_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.copytree(real_run, tmp_path / "copy")
    shutil.move(tmp_path / "copy", moved)
    (moved / REPORT_FILE).unlink(missing_ok=True)
    proc = run_report(f"run_dir={moved}", cwd=tmp_path)
    assert proc.returncode == 0, output_of(proc)
    assert proc.stdout.strip() == str(moved / REPORT_FILE)
    page = (moved / REPORT_FILE).read_text()
    rows = [json.loads(line) for line in (moved / "trials.jsonl").read_text().splitlines() if line.strip()]
    assert numbers_in(page, "fig-front") == {r["number"] for r in rows if r["status"] == "COMPLETE"}
    if (moved / "export" / "model_card.json").is_file():
        assert "No model exported yet" not in page
    assert_offline(page)


# ---- bad input: one line, exit 2, nothing written ----


def _garbage_log(d: Path) -> None:
    (d / "trials.jsonl").write_text("not json at all\n" + json.dumps(make_rows(1)[0]) + "\n")


def _unknown_target(d: Path) -> None:
    (d / "config.yaml").write_text(CONFIG + "search:\n  _target_: os.system\n")


def _outside_artifact(d: Path) -> None:
    rows = make_rows(2)
    rows[0]["artifact"] = "/etc/passwd"
    (d / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _card_list(d: Path) -> None:
    (d / "export").mkdir()
    (d / "export" / "model_card.json").write_text("[1, 2]")


def _metrics_string(d: Path) -> None:
    rows = make_rows(2)
    rows[1]["metrics"] = "fast"
    (d / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _bad_objective(d: Path) -> None:
    (d / "config.yaml").write_text("experiment_name: x\nobjective:\n  metrics: 3\n")


BAD = {
    "garbage trials.jsonl": (_garbage_log, "line 1 is not a trial record"),
    "unknown _target_": (_unknown_target, "os.system"),
    "artifact outside": (_outside_artifact, "outside the run folder"),
    "card not an object": (_card_list, "model_card.json"),
    "metrics a string": (_metrics_string, "metrics is a str"),
    "objective unreadable": (_bad_objective, "objective"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_run_folder_is_refused_in_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spoil, expected = BAD[case]
    run_dir = make_run(tmp_path / "run", make_rows(2), journal=False)
    spoil(run_dir)
    assert main([f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hwnas-report: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (run_dir / REPORT_FILE).exists()


@pytest.mark.parametrize("args", [[], ["run_dir="], ["run_dir={missing}"], ["run_dir={empty}"],
                                  ["run_dir={empty}", "colour=red"]])
def test_bad_arguments_are_refused_in_one_line(args: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    argv = [a.format(missing=tmp_path / "nope", empty=tmp_path / "empty") for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hwnas-report: error: ") and err.count("\n") == 1, err


def test_command_exit_status_and_stderr(tmp_path: Path) -> None:
    """The installed command: exit 2 and one line, as the in-process checks above say."""
    proc = run_report(f"run_dir={tmp_path}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "has no config.yaml" in proc.stderr, proc.stderr


# ---- ReportWriter ----


def test_report_writer_coalesces_and_writes_the_newest(tmp_path: Path) -> None:
    rows = make_rows(60)
    run_dir = make_run(tmp_path / "run", rows, journal=False)
    writer = ReportWriter(run_dir, OBJECTIVES, "live", min_interval_s=0.5)
    start = time.monotonic()
    for k in range(1, len(rows) + 1):
        writer.update(rows[:k])
        time.sleep(0.005)
    elapsed = time.monotonic() - start
    writer.close()
    # 62 updates over ~0.4-1 s: the first write, maybe one or two throttled ones, and the final one
    assert 1 <= writer.writes <= 2 + int(elapsed / 0.5) + 1, (writer.writes, elapsed)
    assert writer.failures == 0
    page = (run_dir / REPORT_FILE).read_text()
    assert numbers_in(page, "fig-front") == {r["number"] for r in rows if r["status"] == "COMPLETE"}
    assert "Failed trials (2)" in page


def test_report_writer_close_without_write_drops_what_waits(tmp_path: Path) -> None:
    rows = make_rows(4)
    run_dir = make_run(tmp_path / "run", rows, journal=False)
    writer = ReportWriter(run_dir, OBJECTIVES, min_interval_s=60)
    writer.update(rows[:1])
    deadline = time.monotonic() + 30
    while writer.writes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    writer.update(rows)  # throttled: waits for the next slot, which never comes
    writer.close(write=False)
    assert writer.writes == 1
    assert numbers_in((run_dir / REPORT_FILE).read_text(), "fig-front") == {0}


def test_report_writer_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = ReportWriter(tmp_path / "gone", OBJECTIVES, min_interval_s=0)  # no such folder: every write fails
    for _ in range(5):
        writer.update(make_rows(3))
    writer.update([None, 3])  # type: ignore[list-item]  # not rows at all
    writer.close(make_rows(3))
    assert writer.writes == 0 and writer.failures >= 1
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("[hwnas] warning: report.html not written") for line in err)
    assert len(err) <= 2  # one line per reason, not one per attempt
