"""Plots write readable PNG files and reject malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from hwnas.search.pareto import non_dominated_mask
from hwnas.search.plots import plot_hypervolume_curve, plot_pareto

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_plot_pareto_with_every_layer(tmp_path):
    rng = np.random.default_rng(0)
    latency = rng.uniform(1, 20, 200)
    accuracy = 1 - np.exp(-latency / 5) * rng.uniform(0.5, 1.5, 200) * 0.5
    front = non_dominated_mask(np.c_[latency, accuracy], ["min", "max"])
    feasible = latency <= 10
    chosen = int(np.flatnonzero(front & feasible)[-1])
    out = plot_pareto(
        tmp_path / "sub" / "pareto.png", latency, accuracy, front_mask=front, x_label="latency_ms",
        y_label="val_accuracy", title="demo", budget=10.0, feasible_mask=feasible,
        chosen_index=chosen, failed_count=3,
    )
    assert out == tmp_path / "sub" / "pareto.png" and _is_png(out)


def test_plot_pareto_minimal_and_empty(tmp_path):
    out = plot_pareto(tmp_path / "empty.png", np.array([]), np.array([]), front_mask=np.array([], dtype=bool),
                      x_label="x", y_label="y", title="no trials")
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"front_mask": np.ones(2, dtype=bool)}, "front_mask must be"),
        ({"chosen_index": 3}, "chosen_index 3"),
        ({"x_direction": "down"}, "x_direction 'down'"),
    ],
)
def test_plot_pareto_rejects_bad_input(tmp_path, kwargs, match):
    args = {"front_mask": np.zeros(3, dtype=bool), "x_label": "x", "y_label": "y", "title": "t", **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_pareto(tmp_path / "p.png", np.arange(3.0), np.arange(3.0), **args)


def test_plot_hypervolume_curve_mixes_single_runs_and_spreads(tmp_path):
    rng = np.random.default_rng(1)
    runs = np.maximum.accumulate(rng.random((5, 40)), axis=1)
    runs[0, 30:] = np.nan  # a run cut short
    out = plot_hypervolume_curve(
        tmp_path / "hv.png", {"random": runs, "tpe": runs ** 0.5, "one sweep": runs[1]},
        x_label="evaluations", y_label="hypervolume ratio", title="samplers",
    )
    assert _is_png(out)
    with_gap = plot_hypervolume_curve(
        tmp_path / "gap.png", {"random": runs, "one sweep": runs[1]},
        x_label="evaluations", y_label="hypervolume ratio", title="samplers", targets=(0.99, 0.998),
    )
    assert _is_png(with_gap)
    from PIL import Image

    # The gap panel sits beside the first: twice as wide, as tall.
    assert Image.open(with_gap).size[0] == 2 * Image.open(out).size[0]
    assert Image.open(with_gap).size[1] == Image.open(out).size[1]


@pytest.mark.parametrize(("curves", "match"), [({}, "curves is empty"), ({"bad": np.ones((2, 2, 2))}, "'bad'")])
def test_plot_hypervolume_curve_rejects_bad_input(tmp_path, curves, match):
    with pytest.raises(ValueError, match=match):
        plot_hypervolume_curve(tmp_path / "hv.png", curves, x_label="x", y_label="y", title="t")
