"""Plots of a run's attribution (matplotlib, PNG).

The figures use matplotlib's object API with the Agg canvas, so they never open a
window, need no display and leave pyplot's global state alone.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from pipeline.analysis.query import top_influences, trajectory
from pipeline.analysis.results import RunResults
from pipeline.reduce_stage import TRACIN_STEP

LABEL_CHARS = 28


def short_text(text: str, limit: int = LABEL_CHARS) -> str:
    """Return `text` on one line, cut to `limit` characters, for axis labels and legends."""
    line = " / ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def to_png(figure: Figure, path: str | Path | None = None) -> bytes:
    """Render a figure as PNG bytes, and write them to `path` when one is given."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _leading_pairs(results: RunResults, test_id: int, k: int, opponents: bool) -> pd.DataFrame:
    """Return the top-k proponents (and opponents) of a test example by TracIn."""
    direction = "both" if opponents else "proponent"
    return top_influences(results, test_id, k=k, steps=[TRACIN_STEP], direction=direction)


def plot_trajectories(
    results: RunResults, test_id: int, k: int = 5, opponents: bool = True
) -> Figure:
    """Draw I_t over loop steps for the k strongest proponents (solid) and opponents (dashed)."""
    leaders = _leading_pairs(results, test_id, k, opponents)
    leaders = leaders.sort_values("score", ascending=False, ignore_index=True)
    paths = trajectory(results, leaders[["test_id", "train_id"]])
    figure = new_figure(7.5, 4.0)
    axes = figure.add_subplot()
    for row in leaders.itertuples():
        line = paths[paths["train_id"] == row.train_id]
        axes.plot(
            line["step"],
            line["score"],
            marker="o",
            linestyle="-" if row.direction == "proponent" else "--",
            label=f"{row.train_id}  {short_text(row.train_text)}  (TracIn {row.score:.3g})",
        )
    axes.axhline(0.0, color="0.6", linewidth=0.8)
    axes.set_xticks(range(1, results.tau + 1))
    axes.set_xlabel("loop step t")
    axes.set_ylabel("SDI term I_t")
    axes.set_title(f"Test {test_id}: {short_text(results.texts.get(test_id, ''), 40)}")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return figure


def plot_step_heatmap(results: RunResults, test_id: int, k: int = 10, scale: str = "row") -> Figure:
    """Draw the k strongest proponents and k strongest opponents (rows) by loop step (columns).

    Colours are I_t on a diverging scale centred at zero (red helps, blue hurts). With
    `scale="row"` each row is divided by its largest |I_t|, so rows of small examples
    still show at which steps they act; `scale="shared"` keeps one scale for all rows.
    """
    if scale not in ("row", "shared"):
        raise ValueError(f"scale={scale!r} is invalid; use row or shared")
    leaders = _leading_pairs(results, test_id, k, opponents=True)
    leaders = leaders.sort_values("score", ascending=False, ignore_index=True)
    paths = trajectory(results, leaders[["test_id", "train_id"]])
    matrix = paths.pivot(index="train_id", columns="step", values="score")
    matrix = matrix.loc[leaders["train_id"]]
    label = "I_t"
    if scale == "row":
        largest = matrix.abs().max(axis=1)
        matrix = matrix.div(largest.where(largest > 0, 1.0), axis=0)
        label = "I_t / max_t |I_t| per row"

    figure = new_figure(6.5, 1.2 + 0.22 * len(matrix))
    axes = figure.add_subplot()
    limit = float(np.nanmax(np.abs(matrix.to_numpy()))) or 1.0
    image = axes.imshow(
        matrix.to_numpy(),
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
        interpolation="nearest",
    )
    axes.set_xticks(range(matrix.shape[1]), [str(step) for step in matrix.columns])
    labels = [
        f"{row.train_id}  {short_text(row.train_text)}  ({row.score:.3g})"
        for row in leaders.itertuples()
    ]
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xlabel("loop step t")
    axes.set_title(
        f"Top proponents and opponents of test {test_id} (TracIn in brackets)", fontsize=10
    )
    figure.colorbar(image, ax=axes, label=label)
    return figure


def plot_peak_histogram(peaks: pd.DataFrame, tau: int) -> Figure:
    """Draw how many test examples have their influence peak at each loop step."""
    counts = peaks["peak_step"].value_counts().reindex(range(1, tau + 1), fill_value=0)
    figure = new_figure(5.0, 3.0)
    axes = figure.add_subplot()
    axes.bar(counts.index, counts.to_numpy(), color="tab:blue")
    axes.set_xticks(range(1, tau + 1))
    axes.set_xlabel("peak loop step")
    axes.set_ylabel("test examples")
    axes.set_title(f"Peak step of {len(peaks)} test examples", fontsize=10)
    return figure
