"""`sdi report RUN`: one self-contained HTML page with a run's plots and tables.

The page contains its images as base64 data URIs and its style inline, so it opens offline
from a single file, also when copied out of an S3 store.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pipeline.analysis.command import REPORT_NAME
from pipeline.analysis.plots import (
    plot_peak_histogram,
    plot_step_heatmap,
    plot_trajectories,
    to_png,
)
from pipeline.analysis.query import peak_steps, top_influences, trajectory
from pipeline.analysis.results import RunNotFoundError, RunResults
from pipeline.analysis.sketches import self_influence
from pipeline.reduce_stage import TRACIN_STEP

logger = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 0.2em; white-space: pre; }
"""


def figure_tag(figure: Figure, alt: str) -> str:
    """Return an <img> element that embeds the figure as a base64 PNG data URI."""
    encoded = base64.b64encode(to_png(figure)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def table_tag(frame: pd.DataFrame) -> str:
    return frame.to_html(
        index=False, border=0, escape=True, float_format=lambda value: f"{value:.4g}"
    )


def choose_test_ids(peaks: pd.DataFrame, count: int) -> list[int]:
    """Pick test examples that show different peak steps.

    For each peak step, in step order, take the example whose influence concentrates
    most there; then fill up with the most concentrated remaining ones.
    """
    ordered = peaks.sort_values(["peak_share", "test_id"], ascending=[False, True])
    chosen = ordered.drop_duplicates("peak_step").sort_values("peak_step")["test_id"].tolist()
    chosen = chosen[:count]
    for test_id in ordered["test_id"]:
        if len(chosen) >= count:
            break
        if test_id not in chosen:
            chosen.append(int(test_id))
    return [int(test_id) for test_id in chosen]


def influence_table(results: RunResults, test_id: int, k: int) -> pd.DataFrame:
    """Return the top-k proponents and opponents by TracIn with their step terms as columns."""
    leaders = top_influences(results, test_id, k=k, steps=[TRACIN_STEP])
    paths = trajectory(results, leaders[["test_id", "train_id"]])
    wide = paths.pivot(index="train_id", columns="step", values="score")
    wide.columns = [f"I_{step}" for step in wide.columns]
    table = leaders[["direction", "rank", "train_id", "train_text"]].join(wide, on="train_id")
    table["TracIn"] = leaders["score"]
    return table


def step_leaders_table(results: RunResults, test_id: int, per_step: int = 3) -> pd.DataFrame:
    """Return the strongest proponents of each loop step as `train_id (score)` cells."""
    ranked = top_influences(results, test_id, k=per_step, direction="proponent")
    ranked["cell"] = [
        f"{row.train_id} {row.train_text} ({row.score:.3g})" for row in ranked.itertuples()
    ]
    table = ranked.pivot(index="step", columns="rank", values="cell").reset_index()
    table.columns = ["step"] + [f"proponent {rank}" for rank in table.columns[1:]]
    table["step"] = ["TracIn" if step == TRACIN_STEP else str(step) for step in table["step"]]
    return table


def peak_summary_table(peaks: pd.DataFrame) -> pd.DataFrame:
    """Return one row per peak step: how many test examples peak there, and the clearest one."""
    rows = []
    for step, group in peaks.groupby("peak_step"):
        clearest = group.sort_values(["peak_share", "test_id"], ascending=[False, True]).iloc[0]
        rows.append(
            {
                "peak step": int(step),
                "test examples": len(group),
                "mean peak share": group["peak_share"].mean(),
                "clearest example": f"{clearest.test_id} {clearest.test_text}",
                "its peak share": clearest.peak_share,
            }
        )
    return pd.DataFrame(rows)


def run_table(results: RunResults) -> pd.DataFrame:
    config = results.config
    counts = results.counts()
    checkpoints = results.checkpoints
    rows = [
        ("run", results.url),
        (
            "task",
            f"{config.task.name} ({counts['train_examples']} train, "
            f"{counts['test_examples']} test examples)",
        ),
        (
            "model",
            f"d_model={config.model.d_model}, n_layers={config.model.n_layers}, "
            f"tau={config.model.tau}",
        ),
        (
            "sketch",
            f"{config.sketch.method}, dim={config.sketch.dim}, seed={config.sketch.seed}, "
            f"loss reduction {config.sketch.loss_reduction}",
        ),
        (
            "checkpoints",
            ", ".join(f"{row.checkpoint} (eta {row.eta:.3g})" for row in checkpoints.itertuples()),
        ),
        ("score rows", str(counts["score_rows"])),
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


def build_report(
    results: RunResults,
    test_ids: list[int] | None = None,
    count: int = 3,
    k: int = 10,
    weight: str = "abs",
) -> str:
    """Return the HTML page of a run: summary, peak steps, self-influence and test examples."""
    started = time.perf_counter()
    peaks = peak_steps(results, weight=weight)
    if test_ids is None:
        test_ids = choose_test_ids(peaks, count)
    known = set(peaks["test_id"])
    unknown = [test_id for test_id in test_ids if test_id not in known]
    if unknown:
        raise KeyError(f"test ids {unknown} are not test examples of run {results.url}")

    parts = [
        f"<h1>Step-decomposed influence: run {html.escape(results.run.name)}</h1>",
        table_tag(run_table(results)),
        "<h2>Where influence concentrates</h2>",
        f"<p class='note'>Peak step: the loop step t with the largest influence mass "
        f"sum<sub>z</sub> {'|I_t(z, z′)|' if weight == 'abs' else 'max(I_t(z, z′), 0)'} "
        f"over all training examples z. Peak share: that step's fraction of the mass "
        f"(1/tau = {1 / results.tau:.2f} means spread evenly).</p>",
        figure_tag(plot_peak_histogram(peaks, results.tau), "histogram of peak steps"),
        table_tag(peak_summary_table(peaks)),
    ]

    parts += [
        "<h2>Highest self-influence</h2>",
        "<p class='note'>Self-influence sum<sub>k</sub> eta<sub>k</sub> ‖S(g<sub>k</sub>(z))‖²: "
        "training examples that their own gradient keeps pulling on. Mislabelled or atypical "
        "examples rank high. Mean loss is over the checkpoints.</p>",
    ]
    try:
        parts.append(table_tag(self_influence(results).head(k)))
    except RunNotFoundError as error:
        # Sketches may have been deleted to save space; the scores alone still make a report.
        logger.warning("run %s: self-influence left out of the report: %s", results.run.name, error)
        parts.append(f"<p class='note'>Not available: {html.escape(str(error))}</p>")

    for test_id in test_ids:
        text = results.texts.get(test_id, "")
        parts += [
            f"<h2>Test example {test_id}: <code>{html.escape(str(text))}</code></h2>",
            figure_tag(plot_trajectories(results, test_id, k=min(k, 5)), f"trajectories {test_id}"),
            figure_tag(plot_step_heatmap(results, test_id, k=k), f"heatmap {test_id}"),
            "<p class='note'>Top proponents of each step (step TracIn ranks by the sum).</p>",
            table_tag(step_leaders_table(results, test_id)),
            "<p class='note'>Top proponents and opponents by TracIn, with their step terms "
            "I_1..I_tau (they sum to TracIn).</p>",
            table_tag(influence_table(results, test_id, k)),
        ]

    seconds = time.perf_counter() - started
    parts.append(f"<p class='note'>Written by sdi report in {seconds:.1f} s.</p>")
    title = html.escape(f"SDI report: {results.run.name}")
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(results: RunResults, output: str | Path | None = None, **options) -> str:
    """Write the report to a local file `output`, or to `<run>/report.html` in the run's store.

    Returns the path or URL written. `options` go to `build_report`.
    """
    page = build_report(results, **options).encode("utf-8")
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(page)
        return str(output)
    relative = results.run.rel(REPORT_NAME)
    results.run.store.write_bytes(relative, page)
    return results.run.store.display(relative)
