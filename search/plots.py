"""PNG plots of a search: the trials with their Pareto front, and hypervolume curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs headless, in workers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_FRONT_COLOR = "tab:blue"


def _mask(mask: np.ndarray | None, n: int, name: str, default: bool) -> np.ndarray:
    if mask is None:
        return np.full(n, default)
    out = np.asarray(mask)
    if out.dtype != bool or out.shape != (n,):
        raise ValueError(f"{name} must be a bool array of shape ({n},), got {out.dtype} {out.shape}")
    return out


def plot_pareto(
    path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    front_mask: np.ndarray,
    x_label: str,
    y_label: str,
    title: str,
    budget: float | None = None,
    feasible_mask: np.ndarray | None = None,
    chosen_index: int | None = None,
    failed_count: int = 0,
    x_direction: str = "min",
) -> Path:
    """Scatter of all trials with the Pareto front as a staircase; returns the PNG's path.

    Grey dots are trials, grey crosses trials outside the budgets, blue the front joined as the
    boundary of the region it dominates (`x_direction` says which way that staircase steps), a
    star the chosen trial, a dashed vertical line the x budget (e.g. latency). Failed trials have
    no point to draw; `failed_count` is written in the corner so they are not silently lost.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    if x_direction not in ("min", "max"):
        raise ValueError(f"x_direction {x_direction!r} is not one of ('max', 'min')")
    n = len(x)
    front = _mask(front_mask, n, "front_mask", False)
    feasible = _mask(feasible_mask, n, "feasible_mask", True)
    if chosen_index is not None and not 0 <= chosen_index < n:
        raise ValueError(f"chosen_index {chosen_index!r} must be a row index in 0..{n - 1}")

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ok = feasible & ~front
    ax.scatter(x[ok], y[ok], s=14, c="0.6", alpha=0.7, linewidths=0, label=f"trials ({n})")
    bad = ~feasible & ~front
    if bad.any():
        ax.scatter(x[bad], y[bad], s=18, c="0.6", marker="x", linewidths=0.8, label="outside budget")
    if front.any():
        order = np.argsort(x[front], kind="stable")
        fx, fy = x[front][order], y[front][order]
        # With x minimised, the front's value holds from one point until the next is reached.
        ax.step(fx, fy, where="post" if x_direction == "min" else "pre", c=_FRONT_COLOR, lw=1.2)
        ax.scatter(fx, fy, s=26, c=_FRONT_COLOR, zorder=3, label=f"Pareto front ({int(front.sum())})")
    if budget is not None:
        ax.axvline(budget, c="tab:red", ls="--", lw=1, label=f"budget {budget:g}")
    if chosen_index is not None:
        ax.scatter(
            [x[chosen_index]], [y[chosen_index]], s=220, marker="*", c="gold", edgecolors="black",
            linewidths=0.8, zorder=4, label="chosen",
        )
    if failed_count:
        ax.text(0.99, 0.01, f"{failed_count} failed trial(s) not shown", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="tab:red")
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_hypervolume_curve(
    path: str | Path,
    curves: Mapping[str, np.ndarray],
    x_label: str,
    y_label: str,
    title: str,
    targets: Sequence[float] = (),
) -> Path:
    """One line per series against evaluations 1..n; returns the PNG's path.

    A 1-D series is drawn as is; a 2-D one (runs x evaluations) as its median with the
    inter-quartile band of the runs. NaN (e.g. a run cut short) is left out of the statistics.
    With `targets` (ratios such as 0.99), a second panel shows the gap 1 - y on log axes, where
    0.98 and 0.995 are far apart (on the first panel they are one line), with each target dashed.
    """
    if not curves:
        raise ValueError("curves is empty; give at least one series name -> array")
    panels = 2 if targets else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=120, squeeze=False)
    ax, gap_ax = axes[0, 0], (axes[0, 1] if targets else None)
    for name, values in curves.items():
        arr = np.asarray(values, dtype=float)
        if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
            raise ValueError(f"series {name!r} has shape {arr.shape}; expected (evals,) or (runs, evals)")
        steps = np.arange(1, arr.shape[-1] + 1)
        if arr.ndim == 1:
            (line,) = ax.plot(steps, arr, lw=1.5, label=name)
            q25 = med = q75 = arr
        else:
            q25, med, q75 = np.nanpercentile(arr, [25, 50, 75], axis=0)
            (line,) = ax.plot(steps, med, lw=1.5, label=f"{name} (median of {arr.shape[0]}, IQR band)")
            ax.fill_between(steps, q25, q75, color=line.get_color(), alpha=0.2, linewidth=0)
        if gap_ax is not None:
            # log axes cannot show a gap of 0 (the whole front found): clip it at a tiny positive value
            floor = 1e-5
            gap_ax.plot(steps, np.clip(1 - med, floor, None), lw=1.5, color=line.get_color())
            if arr.ndim == 2:
                gap_ax.fill_between(steps, np.clip(1 - q75, floor, None), np.clip(1 - q25, floor, None),
                                    color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if gap_ax is not None:
        for t in targets:
            gap_ax.axhline(1 - t, color="black", ls="--", lw=0.8)
            gap_ax.annotate(f"{t:g}", (1, 1 - t), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)
        gap_ax.set(xscale="log", yscale="log", xlabel=f"{x_label} (log)", ylabel=f"1 - {y_label} (log)",
                   title="gap to the true front (targets dashed)")
        gap_ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)  # many plots per run: don't keep figures alive
    return out
