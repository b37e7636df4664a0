"""`report.html`: a sweep read at a glance, one self-contained page in the run folder.

Sections: the summary (trials done and failed, front size, hypervolume), the accuracy-latency front
with every complete trial, hypervolume over trials, the front as a table, the failed trials with
their reasons, Optuna's parameter importances, and the chosen model's card.

The page loads nothing: plotly.js is inlined once (the first figure carries it) and a
Content-Security-Policy forbids any network load, so it opens offline from a copied run folder.
Everything it shows comes from the run folder, which is untrusted (a colleague's shared sweep):
every piece of text, hover labels included, is HTML-escaped.

`write_report` writes it once; `ReportWriter` regenerates it in the background as trials end
(coalesced, never raising into the sweep); `hwnas-report run_dir=PATH` (`main`) writes it for any
finished or running run folder, wherever it has been moved.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.search.export import mark_front
from hwnas.search.objectives import Objectives
from hwnas.search.pareto import hypervolume_curve, nadir_reference
from hwnas.search.schedulers.accounting import schedule_summary
from hwnas.search.trial_log import COMPLETE, REJECTED, STATUSES, STOPPED
from hwnas.search.units import format_ms

REPORT_FILE = "report.html"
CARD_JSON = Path("export") / "model_card.json"
CARD_MD = Path("export") / "MODEL_CARD.md"
PROG = "hwnas-report"
USAGE = "usage: hwnas-report run_dir=PATH [plugins=[...]]"
SECTIONS = ("summary", "front", "hypervolume", "front-table", "schedule", "failed", "importance", "card")

# fANOVA (a seeded random forest) reads best but grows with the trials (~2 s at 200, ~10 s at 2000);
# above this many complete trials PED-ANOVA (a few ms) is used instead.
FANOVA_MAX_TRIALS = 500
MIN_IMPORTANCE_TRIALS = 5  # fewer complete trials than this say nothing about a parameter
MAX_TEXT = 4000  # characters of one untrusted string shown (an error's traceback, a card value)
MAX_MARKDOWN_BYTES = 256 * 1024
# Metrics shown in a point's hover label besides the objectives and budgeted metrics, when present.
HOVER_METRICS = ("test_accuracy", "float_val_accuracy", "latency_p90_ms", "params", "macs", "model_bytes")
FRONT_TABLE_METRICS = ("latency_p90_ms", "params", "macs", "model_bytes")

# The page may run its own inline scripts and styles and show inline images; it loads nothing.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 1.2em 3em;color:#222}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1em}table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}pre{white-space:pre-wrap;word-break:break-word;
background:#f8f8f8;padding:.5em;margin:0;max-height:20em;overflow:auto;font-size:.85em}
.note{color:#555;font-style:italic}.chosen{background:#fff6cc}dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}
dl.kv dt{font-weight:600}dl.kv dd{margin:0}
"""


def esc(value: Any, limit: int = MAX_TEXT) -> str:
    """Text from the run folder as safe HTML (quotes too: it may land in an attribute)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + f" … ({len(text) - limit} more characters)"
    return html.escape(text, quote=True)


def _number(value: Any) -> float | None:
    """A metric's value as a float, or None when it is not a number (a string, a list, a bool-less None)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def fmt(name: str, value: Any) -> str:
    """A metric for people (not escaped): latency via format_ms, counts as integers, others to 4 digits."""
    x = _number(value)
    if x is None:
        return "-" if value is None else str(value)
    if name.endswith("_ms"):
        return format_ms(x)
    if not math.isfinite(x):
        return str(x)
    if float(x).is_integer() and abs(x) >= 1 and name in ("params", "macs", "model_bytes", "n_trials"):
        return f"{int(x):,}"
    return f"{x:.4g}"


def _candidate_text(candidate: Mapping[str, Any], sep: str = ", ") -> str:
    return sep.join(f"{k}={v}" for k, v in candidate.items())


# ----------------------------------------------------------------------------- rows


def _clean(
    rows: Sequence[Any], objectives: Objectives
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(complete, failed, ended early) copies of the rows, in trial order, the last record of a number winning.

    Complete rows have a finite number for every objective and are marked with feasibility and
    front (export.mark_front, under `objectives`); rows the scheduler ended (STOPPED at a rung, REJECTED before
    training) are listed apart; anything else is listed with the failed, with a reason. Input rows are never changed.
    """
    latest: dict[int, dict[str, Any]] = {}
    for r in rows:
        if not isinstance(r, Mapping):
            continue
        number = r.get("number")
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        metrics: Mapping[str, Any] = r["metrics"] if isinstance(r.get("metrics"), Mapping) else {}
        candidate: Mapping[str, Any] = r["candidate"] if isinstance(r.get("candidate"), Mapping) else {}
        latest[number] = {
            "number": number,
            "status": str(r.get("status")),
            "candidate": dict(candidate),
            "shown": dict(metrics),  # as recorded, for display
            "metrics": {str(k): x for k, v in metrics.items() if (x := _number(v)) is not None},
            "error": r.get("error"),
            "node": r.get("node"),
            "arch_id": r.get("arch_id"),
            "epochs": _number(r.get("epochs")),
        }
    complete, failed, early = [], [], []
    for number in sorted(latest):
        r = latest[number]
        if r["status"] in (STOPPED, REJECTED):
            early.append(r)
            continue
        if r["status"] == COMPLETE:
            missing = [n for n in objectives.names if not math.isfinite(r["metrics"].get(n, math.nan))]
            if not missing:
                complete.append(r)
                continue
            r["reason"] = f"recorded COMPLETE without a finite {missing[0]}"
        else:
            r["reason"] = r["error"] if r["error"] else f"status {r['status']}, no error recorded"
        failed.append(r)
    if complete:
        mark_front(complete, objectives)
    return complete, failed, early


def _schedule_section(rows: Sequence[Any], early: list[dict[str, Any]], objectives: Objectives) -> str:
    """What the scheduler saved (search/schedulers/accounting.py) and every trial it ended, with why."""
    s = schedule_summary([r for r in rows if isinstance(r, Mapping)])
    if not early:
        return '<p class="note">No trial was stopped early or rejected before training.</p>'
    stopped = ", ".join(f"{n} at epoch {epoch}" for epoch, n in s["stopped"].items()) or "none"
    head = (f'<p class="note">Training epochs spent: {s["epochs"]:g} of the {s["epochs_full"]:g} these trials would '
            f'have trained in full ({100 * s["saved_share"]:.0f}% saved). Stopped at a rung: {stopped}. '
            + (f'Rejected before training (untrained file over budget {esc(objectives.budget_label)}): {s["rejected"]}. '
               if objectives.budget_label else "No budget, so none rejected before training. ")
            + "Their figures are the untrained file's (latency, size: the trained file's graph) "
            "and, at a rung, the accuracy the rung ranks by; none is on the front or exported.</p>")
    shown = [m for m in ("rung_val_accuracy", "latency_ms", "model_bytes") if any(m in r["metrics"] for r in early)]
    cells = [[str(r["number"]), esc(r["status"]), esc(fmt("epochs", r["epochs"]) if r["epochs"] is not None else "-"),
              *(esc(fmt(m, r["metrics"].get(m))) for m in shown), esc(r.get("error") or "-"),
              esc(_candidate_text(r["candidate"]))] for r in early]
    return head + _table(["trial", "status", "epochs", *(esc(m) for m in shown), "why", "candidate"], cells)


# ----------------------------------------------------------------------------- figures


def _chosen_trial(card: Any) -> Any:
    """The exported trial's number: `candidate.trial` in a model card (hwnas.model_card/1), `trial` in older ones."""
    if not isinstance(card, Mapping):
        return None
    candidate = card.get("candidate")
    if isinstance(candidate, Mapping) and "trial" in candidate:
        return candidate["trial"]
    return card.get("trial")


def _hover(r: dict[str, Any], objectives: Objectives, chosen: int | None) -> str:
    """A point's hover label: escaped text joined by <br> (plotly's own line break)."""
    lines = [f"<b>trial {r['number']}</b>" + (" (chosen)" if r["number"] == chosen else "")]
    names = list(dict.fromkeys([*objectives.names, *objectives.bounds, *HOVER_METRICS]))
    for n in names:
        if n in r["metrics"]:
            lines.append(f"{esc(n)}: {esc(fmt(n, r['metrics'][n]))}")
    if r.get("pareto"):
        lines.append("on the Pareto front")
    if not r.get("feasible"):
        lines.append("outside the budget")
    lines.append("")
    lines.extend(f"{esc(k)}={esc(v, 200)}" for k, v in r["candidate"].items())
    return "<br>".join(lines)


def _front_figure(complete: list[dict[str, Any]], objectives: Objectives, chosen: int | None) -> Any:
    import plotly.graph_objects as go

    two = len(objectives.names) >= 2
    y_name = objectives.names[0]
    x_name = objectives.names[1] if two else "trial"

    def xs(group: list[dict[str, Any]]) -> list[float]:
        return [r["metrics"][x_name] if two else r["number"] for r in group]

    def trace(group: list[dict[str, Any]], name: str, **style: Any) -> Any:
        return go.Scatter(
            x=xs(group), y=[r["metrics"][y_name] for r in group], name=esc(name),
            customdata=[r["number"] for r in group], hovertext=[_hover(r, objectives, chosen) for r in group],
            hovertemplate="%{hovertext}<extra></extra>", **style,
        )

    fig = go.Figure()
    plain = [r for r in complete if r["feasible"] and not r["pareto"]]
    outside = [r for r in complete if not r["feasible"]]
    front = [r for r in complete if r["pareto"]]
    fig.add_trace(trace(plain, f"trials ({len(plain)})", mode="markers",
                        marker={"color": "rgba(120,120,120,0.6)", "size": 7}))
    if outside:
        fig.add_trace(trace(outside, f"outside budget ({len(outside)})", mode="markers",
                            marker={"color": "rgba(120,120,120,0.8)", "size": 8, "symbol": "x"}))
    if front:
        x_min = not two or objectives.modes[1] == "min"
        front = sorted(front, key=lambda r: (xs([r])[0], r["number"]))
        # The front's value holds from one point until the next: a staircase, like pareto.png.
        fig.add_trace(trace(front, f"Pareto front ({len(front)})", mode="lines+markers",
                            line={"shape": "hv" if x_min else "vh", "color": "#1f77b4", "width": 1.5},
                            marker={"color": "#1f77b4", "size": 9}))
    picked = [r for r in complete if r["number"] == chosen]
    if picked:
        fig.add_trace(trace(picked, "chosen", mode="markers",
                            marker={"color": "gold", "size": 18, "symbol": "star", "line": {"color": "black", "width": 1}}))
    for name, (kind, bound) in objectives.bounds.items():
        label = esc(f"budget {name} {'<=' if kind == 'upper' else '>='} {fmt(name, bound)}")
        if two and name == x_name:
            fig.add_vline(x=bound, line={"color": "crimson", "dash": "dash", "width": 1},
                          annotation_text=label, annotation_position="top left")
        elif name == y_name:
            fig.add_hline(y=bound, line={"color": "crimson", "dash": "dash", "width": 1},
                          annotation_text=label, annotation_position="bottom right")
    fig.update_layout(
        xaxis_title=esc(x_name), yaxis_title=esc(y_name), template="plotly_white", height=520,
        margin={"l": 60, "r": 20, "t": 30, "b": 50}, legend={"orientation": "h", "y": -0.15},
        hoverlabel={"align": "left"},
    )
    return fig


def _hypervolume(complete: list[dict[str, Any]], failed: list[dict[str, Any]], objectives: Objectives,
                 ) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """(trial numbers, hypervolume after each, reference) over all trials in order; None without a feasible one.

    The reference is just worse than the worst feasible value of each objective (nadir_reference
    over every feasible trial), so every feasible trial can add to the volume.
    """
    feasible = [r for r in complete if r["feasible"]]
    if not feasible:
        return None
    modes = list(objectives.modes)
    reference = nadir_reference(objectives.matrix([r["metrics"] for r in feasible]), modes)
    ordered = sorted(complete + failed, key=lambda r: r["number"])
    nan = [math.nan] * len(objectives.names)
    points = np.array([[r["metrics"][n] for n in objectives.names] if r.get("feasible") else nan for r in ordered],
                      dtype=float).reshape(len(ordered), len(objectives.names))
    curve = hypervolume_curve(points, modes, reference)
    return [r["number"] for r in ordered], curve, reference


def _hypervolume_figure(numbers: list[int], curve: np.ndarray) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(
        x=numbers, y=curve.tolist(), mode="lines+markers", line={"shape": "hv", "color": "#2ca02c"},
        marker={"size": 5}, name="hypervolume", hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>",
    ))
    fig.update_layout(xaxis_title="trial", yaxis_title="hypervolume (feasible trials)", template="plotly_white",
                      height=360, margin={"l": 60, "r": 20, "t": 20, "b": 50})
    if len(numbers) <= 20:
        fig.update_xaxes(dtick=1)  # trial numbers are integers: no 0.5 ticks
    return fig


def _importance_figure(importances: Mapping[str, float]) -> Any:
    import plotly.graph_objects as go

    names = list(importances)[::-1]  # plotly draws bars bottom-up: most important on top
    fig = go.Figure(go.Bar(
        x=[float(importances[n]) for n in names], y=[esc(n) for n in names], orientation="h",
        marker={"color": "#9467bd"}, hovertemplate="%{y}: %{x:.3f}<extra></extra>",
    ))
    fig.update_layout(xaxis_title="importance", template="plotly_white", height=120 + 28 * len(names),
                      margin={"l": 160, "r": 20, "t": 20, "b": 50})
    return fig


# ----------------------------------------------------------------------------- importances


def param_importances(run_dir: Path, objectives: Objectives) -> tuple[dict[str, float] | None, str]:
    """Optuna's importances of the parameters for the first objective, from the run folder's journal,
    and a note saying how they were computed or why there are none. Never raises."""
    from hwnas.search.sweep_state import JOURNAL_FILE, STATE_FILE

    if not (run_dir / JOURNAL_FILE).is_file():
        return None, f"No importances: the run folder has no {JOURNAL_FILE} (Optuna's record of the search)."
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
        study_name = state["study_name"] if isinstance(state, dict) else None
        if not isinstance(study_name, str):
            raise ValueError(f"{STATE_FILE} names no study")
    except (OSError, ValueError, KeyError) as exc:
        return None, f"No importances: {STATE_FILE} cannot be read ({type(exc).__name__})."
    try:
        import optuna
        from optuna.trial import TrialState

        from hwnas.search.sweep_state import journal_storage

        study = optuna.load_study(study_name=study_name, storage=journal_storage(run_dir))
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < MIN_IMPORTANCE_TRIALS:
            return None, (f"Too few trials for importances: {len(done)} complete in the study, "
                          f"at least {MIN_IMPORTANCE_TRIALS} are needed to say anything about a parameter.")
        sign = -1.0 if objectives.modes[0] == "max" else 1.0
        if len(done) <= FANOVA_MAX_TRIALS:
            evaluator: Any = optuna.importance.FanovaImportanceEvaluator(seed=0)
            how = "fANOVA (seeded)"
            target = lambda t: t.values[0]  # noqa: E731
        else:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            how = f"PED-ANOVA (more than {FANOVA_MAX_TRIALS} trials: fANOVA would take too long)"
            target = lambda t: sign * t.values[0]  # noqa: E731  (PED-ANOVA ranks low values as good)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
    except Exception as exc:  # a damaged journal, a parameter with one value: say so, don't fail the report
        first = (str(exc).splitlines() or [""])[0]
        return None, f"Optuna could not compute importances: {type(exc).__name__}: {first}"
    if not result:
        return None, ("No importances: no parameter was sampled in every complete trial with more than one value "
                      "(Optuna's importances use the parameters all complete trials share).")
    note = (f"{how} over {len(done)} complete trials, for {objectives.names[0]}. Only parameters every complete "
            "trial has are ranked (conditional ones, such as a stage that not all networks have, are left out).")
    return {str(k): float(v) for k, v in result.items()}, note


# ----------------------------------------------------------------------------- HTML pieces


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    """A table of already-escaped cells; `classes` per row (e.g. 'chosen')."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, cells in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, Mapping) and node:
        out = []
        for k, v in node.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, node)]


def _card_value(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple, Mapping)):
        return esc(json.dumps(value, default=str))
    x = _number(value)
    if x is not None and key.endswith("_ms") and not isinstance(value, bool):
        return esc(f"{fmt(key, x)} ({value})")
    return esc("null" if value is None else value)


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(title)}</h2>\n{body}\n</section>'


class _Figures:
    """Figures as HTML: plotly.js goes into the first one only."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, fig: Any, div_id: str) -> str:
        out = fig.to_html(
            full_html=False, include_plotlyjs=self.count == 0, include_mathjax=False, div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        self.count += 1
        return out


Importances = tuple[dict[str, float] | None, str]  # param_importances' answer: values (or None) and a note


def render(run_dir: Path, objectives: Objectives, rows: Sequence[Any], *, card: Mapping[str, Any] | None = None,
           title: str | None = None, importances: bool | Importances = True) -> str:
    """The whole page as a string (write_report writes it). `importances`: True computes them,
    False leaves them out, a (values, note) pair is shown as given (ReportWriter's cached ones)."""
    run_dir = Path(run_dir)
    complete, failed, early = _clean(rows, objectives)
    chosen = _chosen_trial(card)
    chosen = chosen if isinstance(chosen, int) and not isinstance(chosen, bool) else None
    figures = _Figures()
    front = sorted((r for r in complete if r["pareto"]), key=lambda r: r["metrics"][objectives.names[0]],
                   reverse=objectives.modes[0] == "max")
    hv = _hypervolume(complete, failed + early, objectives)
    name = title or run_dir.name
    written = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    budgets = objectives.budget_label or "none"
    goal = ", ".join(f"{n} ({'higher' if m == 'max' else 'lower'} is better)" for n, m in zip(objectives.names, objectives.modes, strict=True))
    summary = [
        ("sweep", esc(name)), ("run folder", esc(run_dir.name)),
        ("trials", f"{len(complete) + len(failed) + len(early)} recorded: {len(complete)} complete, {len(failed)} failed"
                   + (f", {len(early)} ended by the scheduler" if early else "")),
        ("within budget", f"{sum(r['feasible'] for r in complete)} of {len(complete)} complete"),
        ("front size", str(len(front))),
        ("hypervolume", f"{hv[1][-1]:.4g}" if hv else "- (no feasible trial yet)"),
        ("objectives", esc(goal)), ("budgets", esc(budgets)),
        ("chosen model", f"trial {chosen}" if chosen is not None else "none yet"),
        ("written", esc(written)),
    ]
    parts = [_section("summary", f"Sweep {name}", '<dl class="kv">' + "".join(
        f"<dt>{k}</dt><dd>{v}</dd>" for k, v in summary) + "</dl>")]

    # the front with every complete trial
    if complete:
        extra = "" if len(objectives.names) <= 2 else (
            f'<p class="note">Only the first two of {len(objectives.names)} objectives are drawn; the front is over all.</p>')
        body = (f'<p class="note">Every complete trial: {len(complete)} points. Hover a point for its candidate and metrics.'
                f"</p>{extra}{figures.html(_front_figure(complete, objectives, chosen), 'fig-front')}")
    else:
        body = '<p class="note">No complete trial yet: nothing to draw.</p>'
    title_front = f"{objectives.names[0]} against {objectives.names[1]}" if len(objectives.names) >= 2 else objectives.names[0]
    parts.append(_section("front", f"Front: {title_front}", body))

    # hypervolume over trials
    if hv is not None:
        numbers, curve, reference = hv
        ref = ", ".join(f"{esc(n)} {esc(fmt(n, v))}" for n, v in zip(objectives.names, reference, strict=True))
        body = (f'<p class="note">Volume dominated by the feasible trials so far, bounded by the reference point {ref} '
                f"(just worse than the worst feasible value of each objective).</p>"
                f"{figures.html(_hypervolume_figure(numbers, curve), 'fig-hypervolume')}")
    else:
        body = '<p class="note">No feasible complete trial yet: no hypervolume.</p>'
    parts.append(_section("hypervolume", "Hypervolume over trials", body))

    # the front as a table
    if front:
        shown = list(dict.fromkeys([*objectives.names, *objectives.bounds, *FRONT_TABLE_METRICS]))
        shown = [m for m in shown if any(m in r["metrics"] for r in front)]
        header = ["trial", *(esc(m) for m in shown), "arch_id", "candidate"]
        cells = [[str(r["number"]), *(esc(fmt(m, r["metrics"].get(m))) for m in shown), esc(r["arch_id"] or "-"),
                  esc(_candidate_text(r["candidate"]))] for r in front]
        body = (f'<p class="note">{len(front)} feasible trials no other trial beats in every objective, best '
                f"{esc(objectives.names[0])} first; the chosen one highlighted.</p>"
                + _table(header, cells, ["chosen" if r["number"] == chosen else "" for r in front]))
    else:
        body = '<p class="note">No trial on the front yet.</p>'
    parts.append(_section("front-table", "The front", body))

    parts.append(_section("schedule", f"Stopped early and rejected before training ({len(early)})",
                          _schedule_section(rows, early, objectives)))

    # failed trials with their reasons
    if failed:
        cells = [[str(r["number"]), esc(r["status"]), esc(r["node"] if r["node"] is not None else "-"),
                  f"<pre>{esc(r['reason'])}</pre>", esc(_candidate_text(r["candidate"]))] for r in failed]
        body = _table(["trial", "status", "node", "reason", "candidate"], cells)
    else:
        body = '<p class="note">No trial failed.</p>'
    parts.append(_section("failed", f"Failed trials ({len(failed)})", body))

    # parameter importances
    if isinstance(importances, tuple):
        values, note = importances
    elif importances:
        values, note = param_importances(run_dir, objectives)
    else:
        values, note = None, "Importances are computed when the report is written at the end of the sweep."
    body = f'<p class="note">{esc(note)}</p>'
    if values:
        body += figures.html(_importance_figure(values), "fig-importance")
        body += _table(["parameter", "importance"], [[esc(k), f"{v:.3f}"] for k, v in values.items()])
    parts.append(_section("importance", "Parameter importances", body))

    # the chosen model's card
    if isinstance(card, Mapping):
        body = _table(["field", "value"], [[esc(k), _card_value(k, v)] for k, v in _flatten(card)])
        md = run_dir / CARD_MD
        if md.is_file():
            with open(md, "rb") as f:
                text = f.read(MAX_MARKDOWN_BYTES).decode("utf-8", errors="replace")
            body += f"<h3>{esc(CARD_MD.as_posix())}</h3><pre>{esc(text, MAX_MARKDOWN_BYTES)}</pre>"
    else:
        body = '<p class="note">No model exported yet (the sweep is running, or no trial met the budgets).</p>'
    parts.append(_section("card", "Chosen model's card", body))

    nav = "".join(f'<a href="#{k}">{k.replace("-", " ")}</a>' for k in SECTIONS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(name)}: hwnas report</title><style>{STYLE}</style></head>\n<body>"
        f"<h1>hwnas sweep report: {esc(name)}</h1><nav>{nav}</nav>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(run_dir: Path, objectives: Objectives, rows: list[dict[str, Any]], *,
                 card: dict[str, Any] | None = None, title: str | None = None,
                 importances: bool | Importances = True) -> Path:
    """Write `run_dir/report.html` atomically (a reader never sees half a page); returns its path.

    `rows`: trials.jsonl's records (not changed: feasibility and front are worked out on copies under
    `objectives`). `card`: the export's model_card.json, whose `candidate.trial` is the chosen one.
    `importances=False` skips Optuna's importances (they re-read the journal); a (values, note) pair
    is shown as given.
    """
    run_dir = Path(run_dir)
    page = render(run_dir, objectives, rows, card=card, title=title, importances=importances)
    path = run_dir / REPORT_FILE
    tmp = run_dir / f".{REPORT_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- during a sweep


class ReportWriter:
    """Regenerates report.html in a background thread while a sweep runs.

    `update(rows)` only hands over the newest rows: one write at a time, at most one every
    `min_interval_s`, the newest rows winning (updates in between are coalesced). A failing write
    prints one warning line (again only when the reason changes) and never raises into the sweep.
    Importances (a second or two of fANOVA with a few hundred trials) are recomputed at most every
    `importance_interval_s` and on the final page; pages in between show the last ones.
    `close(rows, card)` writes the final page at once and joins the thread; `close(write=False)`
    drops what waits and joins (a page being written is finished first, so a later write_report,
    e.g. finalize's, is never replaced by an older page).
    """

    def __init__(self, run_dir: Path, objectives: Objectives, title: str | None = None, *,
                 min_interval_s: float = 5.0, importance_interval_s: float = 60.0, importances: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.objectives = objectives
        self.title = title
        self.min_interval_s = float(min_interval_s)
        self.importances = importances
        self.importance_interval_s = float(importance_interval_s)
        self._importances: Importances | None = None
        self._importances_at = -math.inf
        self.writes = 0  # pages written (for tests and the summary)
        self.failures = 0
        self._cond = threading.Condition()
        self._pending: list[dict[str, Any]] | None = None
        self._card: dict[str, Any] | None = None
        self._closing = False
        self._last = -math.inf
        self._warned: str | None = None
        self._thread: threading.Thread | None = None

    def update(self, rows: Sequence[Mapping[str, Any]], card: Mapping[str, Any] | None = None) -> None:
        try:
            snapshot = [dict(r) for r in rows]  # the driver keeps changing its own dicts
            with self._cond:
                if self._closing:
                    return
                self._pending = snapshot
                if card is not None:
                    self._card = dict(card)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="hwnas-report", daemon=True)
                    self._thread.start()
                self._cond.notify()
        except Exception as exc:  # never into the sweep
            self._warn(exc)

    def close(self, rows: Sequence[Mapping[str, Any]] | None = None, card: Mapping[str, Any] | None = None,
              *, write: bool = True, timeout: float | None = None) -> None:
        """Write the final page now (the newest rows given so far, or `rows`) and stop the thread;
        with `write=False` only stop it (whoever closes writes the final page itself)."""
        try:
            with self._cond:
                if not write:
                    self._pending = None
                elif rows is not None:
                    self._pending = [dict(r) for r in rows]
                if card is not None:
                    self._card = dict(card)
                self._closing = True
                thread = self._thread
                self._cond.notify()
            if thread is not None:
                thread.join(timeout)
            elif write and self._pending is not None:  # never started: write here
                self._write(self._pending, final=True)
        except Exception as exc:
            self._warn(exc)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:  # closing with nothing new
                    return
                wait = self._last + self.min_interval_s - time.monotonic()
                if wait > 0 and not self._closing:
                    self._cond.wait(wait)  # more rows may come meanwhile: the newest are written
                    continue
                rows, self._pending = self._pending, None
                final = self._closing
            self._write(rows, final)
            if final:
                with self._cond:
                    if self._pending is None:
                        return

    def _write(self, rows: list[dict[str, Any]], final: bool) -> None:
        self._last = time.monotonic()
        try:
            importances: bool | Importances = False
            if self.importances:
                if final or self._importances is None or self._last - self._importances_at >= self.importance_interval_s:
                    self._importances = param_importances(self.run_dir, self.objectives)
                    self._importances_at = self._last
                importances = self._importances
            write_report(self.run_dir, self.objectives, rows, card=self._card, title=self.title,
                         importances=importances)
            self.writes += 1
        except Exception as exc:  # noqa: BLE001  a report must never stop a sweep
            self.failures += 1
            self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if reason != self._warned:
            self._warned = reason
            print(f"[hwnas] warning: report.html not written ({reason})", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- hwnas-report


class ReportInputError(ValueError):
    """A run folder the report cannot be made from; one line."""


def check_rows(rows: list[Any], where: str) -> None:
    """The fields the report reads have the types hwnas writes (check_trial_log only checks the JSON)."""
    types = {"status": (str,), "candidate": (dict,), "metrics": (dict, type(None)), "error": (str, type(None))}
    for r in rows:
        number = r.get("number")
        if not isinstance(number, int) or isinstance(number, bool):
            raise ReportInputError(f"run_dir: {where} trial number {number!r} is not an integer; "
                                   "allowed: the trials.jsonl hwnas wrote")
        for key, allowed in types.items():
            if key in r and not isinstance(r[key], allowed):
                raise ReportInputError(f"run_dir: {where} trial {number} {key} is a {type(r[key]).__name__}; "
                                       f"allowed: {' or '.join(t.__name__ for t in allowed)}")
        if "status" not in r:
            raise ReportInputError(f"run_dir: {where} trial {number} has no status; allowed: {', '.join(STATUSES)}")


def _objectives(cfg: Any) -> Objectives:
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.to_container(cfg.objective, resolve=True)
        objectives = Objectives.from_config(node)  # type: ignore[arg-type]
    except Exception as exc:
        raise ReportInputError(f"objective: the saved config.yaml's objective cannot be read ({type(exc).__name__}); "
                               "allowed: metrics [{name, mode}], latency_budget_ms, budgets") from None
    for n, m in zip(objectives.names, objectives.modes, strict=True):
        if not isinstance(n, str) or not n or m not in ("max", "min"):
            raise ReportInputError(f"objective.metrics: {n!r} {m!r}; allowed: a metric name and mode max or min")
    if not objectives.names:
        raise ReportInputError("objective.metrics: empty; allowed: at least one {name, mode}")
    return objectives


def _read_card(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CARD_JSON
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportInputError(f"run_dir: {str(path)!r} is not JSON ({type(exc).__name__}); "
                               "allowed: the model_card.json hwnas-export wrote") from None
    if not isinstance(card, dict):
        raise ReportInputError(f"run_dir: {str(path)!r} holds a {type(card).__name__}; allowed: a JSON object (the model card)")
    return card


def _fail(message: str) -> int:
    from hwnas.search.cli import _fail as fail  # the commands' one error line and exit status

    return fail(PROG, message)


def main(argv: Sequence[str] | None = None) -> int:
    """`hwnas-report run_dir=PATH [plugins=[...]]`: write report.html for a run folder; prints its path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from hwnas.search.cli import _plugins_arg
    from hwnas.search.config import ConfigError
    from hwnas.search.launch import quiet_warnings

    quiet_warnings()
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    rest = [a for a in args if not a.startswith("run_dir=")]
    bad = [a for a in rest if not a.lstrip("+").startswith("plugins=")]
    if bad:
        return _fail(f"{bad[0].split('=', 1)[0]}: not allowed; {USAGE}")
    if len(run_dirs) != 1 or not run_dirs[0].strip():
        return _fail(f"run_dir: missing; {USAGE}")
    run_dir = Path(run_dirs[0])
    saved = run_dir / "config.yaml"
    if not run_dir.is_dir():
        return _fail(f"run_dir: {str(run_dir)!r} is not a folder; allowed: the run_dir of a sweep")
    if not saved.is_file():
        return _fail(f"run_dir: {str(run_dir)!r} has no config.yaml; allowed: the run_dir of a sweep")
    try:
        from hwnas.search.checks import check_trial_log
        from hwnas.search.run_folder import check_run_folder, load_run_config
        from hwnas.search.trial_log import TRIALS_JSONL, TrialLog

        cfg = load_run_config(saved, _plugins_arg(rest))
        objectives = _objectives(cfg)
        check_trial_log(run_dir / TRIALS_JSONL)
        rows = TrialLog(run_dir).rows()
        check_rows(rows, str(run_dir / TRIALS_JSONL))
        check_run_folder(run_dir, cfg, rows)
        card = _read_card(run_dir)
        name = cfg.get("experiment_name")
    except (ConfigError, ValueError) as exc:  # checks.ValueProblem and ReportInputError are ValueErrors
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    try:
        path = write_report(run_dir, objectives, rows, card=card, title=name if isinstance(name, str) else None)
    except OSError as exc:
        return _fail(f"run_dir: {str(run_dir / REPORT_FILE)!r} cannot be written ({type(exc).__name__}); "
                     "allowed: a run folder you can write to")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
