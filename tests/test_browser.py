"""A finished sweep as a person sees it, in a real browser: Debian's headless Chromium driven by Playwright.

The MLflow UI (`mlflow server` on loopback over the sweep's SQLite store) opened with the link hwnas
prints lists the parent run in the runs table (the classic ML view, not GenAI), and a child run's page
shows its metrics; the sweep's report.html, opened from the file, draws its figures (plotly renders
SVG points for every complete trial) and has its front table and model card.

Never `playwright install`: the browser is the system's chromium; the test skips without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import hwnas, mlflow_runs, output_of

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the dev extra is not installed
    sync_playwright = None  # type: ignore[assignment]

if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the browser checks need it",
                allow_module_level=True)
if sync_playwright is None:
    pytest.skip("playwright is not importable (pip install playwright; never `playwright install`)",
                allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPERIMENT = "hwnas-browser"
N_TRIALS = 3
UI_TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The link hwnas prints (hwnas.search.tracking.ui_link), pointed at this server."""
    try:
        from hwnas.search.tracking import ui_link
    except ImportError:  # built the documented way: MLflow 3.17's hash route with the classic ML view
        path = f"/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
        return f"{base}/#{path}?workflowType=machine_learning"
    return ui_link(base, experiment_id, run_id)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root}/mlflow.db"
    run_dir = root / "browser-sweep"
    proc = hwnas("experiment=smoke", "runner=local", f"n_trials={N_TRIALS}", "search=random", "evaluator.epochs=1",
                 f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", f"run_dir={run_dir}", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    return {"root": root, "uri": uri, "run_dir": run_dir}


@pytest.fixture(scope="module")
def server(sweep: dict[str, Any]) -> Iterator[str]:
    """`mlflow server` over the sweep's store on a free loopback port; stopped by its own pid (and group)."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(sweep["root"] / "server.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", sweep["uri"], "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=sweep["root"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health: {(sweep['root'] / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # uvicorn and job runner children it started, if any are left
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    assert sync_playwright is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 900})
            yield tab
        finally:
            browser.close()


def test_mlflow_ui_lists_the_parent_run_and_shows_a_child_runs_metrics(sweep: dict[str, Any], server: str,
                                                                        page: Any) -> None:
    from mlflow.tracking import MlflowClient

    parents, children = mlflow_runs(sweep["uri"], EXPERIMENT)
    parent = next(r for r in parents if r.info.run_name == sweep["run_dir"].name)
    trials = [c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and "val_accuracy" in c.data.metrics]
    assert trials, "no child run with metrics"
    child = trials[0]
    experiment_id = MlflowClient(sweep["uri"]).get_experiment_by_name(EXPERIMENT).experiment_id

    page.goto(ui_url(server, experiment_id))
    page.get_by_text(sweep["run_dir"].name, exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
    # the classic ML runs table (the link's workflowType), not the GenAI view
    assert page.get_by_text("Run Name", exact=True).first.is_visible()

    page.goto(ui_url(server, experiment_id, child.info.run_id))
    page.get_by_text("val_accuracy", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
    text = page.locator("body").inner_text()
    assert "latency_ms" in text and child.info.run_name in text
    for name in ("val_accuracy", "latency_ms"):
        shown = str(round(child.data.metrics[name], 4))[:5]  # the UI rounds; its leading digits are these
        assert shown in text, (name, shown)
    assert not any(k.startswith("config/") for k in child.data.metrics)  # only metrics are metrics


def test_report_renders_in_the_browser(sweep: dict[str, Any], page: Any) -> None:
    run_dir: Path = sweep["run_dir"]
    report = run_dir / "report.html"
    if not report.is_file():  # written by the sweep's finalize; if it was not, write it here (and say so)
        from hwnas.search.report import main

        print("report.html was not written by the sweep: written by hwnas-report here")
        assert main([f"run_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines() if line.strip()]
    complete = [r for r in rows if r["status"] == "COMPLETE"]
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.resolve().as_uri())
    page.locator("#fig-front .scatterlayer .point").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert page.locator(".js-plotly-plot").count() >= 2
    # every complete trial is a point (the chosen one is drawn twice: as a trial and as the star)
    assert page.locator("#fig-front .scatterlayer .point").count() >= len(complete)
    assert page.locator("#fig-hypervolume .scatterlayer .point").count() == len(rows)
    assert page.locator("#front-table table tbody tr").count() >= 1
    assert page.locator("#card").count() == 1 and page.locator("#failed").count() == 1
    if (run_dir / "export" / "model_card.json").is_file():
        assert page.locator("#card table").count() == 1
    # hovering a point shows its label (the plot's drag layer takes the events: move the mouse there)
    box = page.locator("#fig-front .scatterlayer .point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.locator("#fig-front .hoverlayer .hovertext").first.wait_for(timeout=10_000)
    assert "trial " in (page.locator("#fig-front .hoverlayer").text_content() or "")
    assert errors == [], errors
    assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests  # nothing from the network
