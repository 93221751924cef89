"""Query helpers over a run's scores: proponents, opponents, trajectories and peak steps.

Every helper returns a pandas DataFrame with plain columns (no index to reset) and a
decoded `test_text` / `train_text` column next to each id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.analysis.results import RunResults
from pipeline.reduce_stage import TRACIN_STEP

logger = logging.getLogger(__name__)

DIRECTIONS = ("proponent", "opponent")
WEIGHTS = ("abs", "positive")


def _directions(direction: str) -> tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is invalid; use proponent, opponent or both")
    return (direction,)


def _steps(results: RunResults, steps: Iterable[int] | None) -> list[int]:
    valid = list(range(TRACIN_STEP, results.tau + 1))
    if steps is None:
        return valid
    steps = sorted({int(step) for step in steps})
    bad = [step for step in steps if step not in valid]
    if bad:
        raise ValueError(
            f"steps {bad} are outside 0..{results.tau} (0 ranks by TracIn, 1..tau are loop steps)"
        )
    return steps


def _add_texts(results: RunResults, frame: pd.DataFrame) -> pd.DataFrame:
    if "test_id" in frame:
        frame["test_text"] = results.text(frame["test_id"])
    if "train_id" in frame:
        frame["train_text"] = results.text(frame["train_id"])
    return frame


def rank_influences(frame: pd.DataFrame, k: int, directions: tuple[str, ...]) -> pd.DataFrame:
    """Rank (test_id, step, train_id, score) rows into the k strongest per direction.

    Proponents have the largest scores, opponents the most negative; ties go to the
    smaller train_id, as in the reduce stage's `topk` table.
    """
    parts = []
    for direction in directions:
        part = frame.assign(
            direction=direction,
            strength=frame["score"] if direction == "proponent" else -frame["score"],
        )
        part = part.sort_values(
            ["test_id", "step", "strength", "train_id"], ascending=[True, True, False, True]
        )
        part = part.groupby(["test_id", "step"], sort=False).head(k).copy()
        part["rank"] = part.groupby(["test_id", "step"], sort=False).cumcount() + 1
        parts.append(part)
    ranked = pd.concat(parts, ignore_index=True)
    ranked = ranked.sort_values(["test_id", "step", "direction", "rank"], ignore_index=True)
    columns = ["test_id", "step", "direction", "rank", "train_id", "score"]
    return ranked[columns].astype({"step": "int32", "rank": "int32"})


def _check_test_id(results: RunResults, test_id: int) -> None:
    if test_id not in set(results.test_ids()):
        raise KeyError(f"test_id {test_id} is not a test example of run {results.url}")


def top_influences(
    results: RunResults,
    test_id: int,
    k: int = 10,
    steps: Iterable[int] | None = None,
    direction: str = "both",
) -> pd.DataFrame:
    """Return the k strongest proponents and/or opponents of one test example per step.

    Step 0 ranks by TracIn (all loop steps together); steps 1..tau rank by the SDI term
    I_t. Columns: test_id, step, direction, rank, train_id, score, test_text, train_text.
    Rows come from the stored `topk` table when it contains k rows per group, otherwise from
    the full `scores` and `tracin` tables.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    directions = _directions(direction)
    requested = _steps(results, steps)
    _check_test_id(results, test_id)

    stored_k = results.topk_depth
    if k <= stored_k and results.has_table("topk"):
        where = (
            (ds.field("test_id") == test_id)
            & ds.field("step").isin(requested)
            & ds.field("direction").isin(list(directions))
            & (ds.field("rank") <= k)
        )
        ranked = results.read_frame("topk", filter=where)
        columns = ["test_id", "step", "direction", "rank", "train_id", "score"]
        ranked = ranked.sort_values(["step", "direction", "rank"], ignore_index=True)[columns]
        ranked = ranked.astype({"step": "int32", "rank": "int32"})
    else:
        frames = []
        loop_steps = [step for step in requested if step != TRACIN_STEP]
        if loop_steps:
            where = (ds.field("test_id") == test_id) & ds.field("step").isin(loop_steps)
            frames.append(results.read_frame("scores", filter=where))
        if TRACIN_STEP in requested:
            tracin = results.read_frame("tracin", filter=ds.field("test_id") == test_id)
            frames.append(tracin.assign(step=TRACIN_STEP))
        ranked = rank_influences(pd.concat(frames, ignore_index=True), k, directions)
    return _add_texts(results, ranked)


def _as_pairs(pairs: Iterable[tuple[int, int]] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(pairs, pd.DataFrame):
        missing = {"test_id", "train_id"} - set(pairs.columns)
        if missing:
            raise ValueError(f"pairs lacks columns {sorted(missing)}; pass test_id and train_id")
        frame = pairs[["test_id", "train_id"]]
    else:
        frame = pd.DataFrame(list(pairs), columns=["test_id", "train_id"])
    if frame.empty:
        raise ValueError("pairs is empty; pass at least one (test_id, train_id) pair")
    return frame.astype("int64").drop_duplicates(ignore_index=True)


def trajectory(
    results: RunResults, pairs: Iterable[tuple[int, int]] | pd.DataFrame
) -> pd.DataFrame:
    """Return the step trajectory I_1..I_tau of each (test_id, train_id) pair.

    Columns: test_id, train_id, step, score, cumulative (the running sum over steps,
    which ends at TracIn), tracin, test_text, train_text. Raises KeyError naming the
    pairs that the run does not contain.
    """
    requested = _as_pairs(pairs)
    where = ds.field("test_id").isin(requested["test_id"].unique().tolist()) & ds.field(
        "train_id"
    ).isin(requested["train_id"].unique().tolist())
    scores = results.read_frame("scores", filter=where).merge(requested, on=["test_id", "train_id"])
    found = scores[["test_id", "train_id"]].drop_duplicates()
    missing = requested.merge(found, how="left", indicator=True)
    missing = missing[missing["_merge"] == "left_only"]
    if not missing.empty:
        listed = list(missing[["test_id", "train_id"]].itertuples(index=False, name=None))
        raise KeyError(f"pairs {listed[:10]} have no scores in run {results.url}")

    scores = scores.sort_values(["test_id", "train_id", "step"], ignore_index=True)
    grouped = scores.groupby(["test_id", "train_id"], sort=False)["score"]
    scores["cumulative"] = grouped.cumsum()
    scores["tracin"] = grouped.transform("sum")
    return _add_texts(results, scores)


def step_mass(
    results: RunResults, test_ids: Iterable[int] | None = None, weight: str = "abs"
) -> pd.DataFrame:
    """Return the influence mass of each loop step per test example.

    mass_t(z') = sum over train examples z of w(I_t(z, z')), with w(x) = |x| for
    `weight="abs"` and w(x) = max(x, 0) for `weight="positive"`. Columns: test_id, step,
    mass, share (mass over the sum of the example's masses). A share of 1/tau at every
    step means that no step dominates.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"weight={weight!r} is invalid; use one of {WEIGHTS}")
    where = None if test_ids is None else ds.field("test_id").isin([int(t) for t in test_ids])
    table = results.read_table("scores", ["test_id", "step", "score"], filter=where)
    score = table.column("score")
    weighted = pc.abs(score) if weight == "abs" else pc.max_element_wise(score, pa.scalar(0.0))
    table = table.append_column("weighted", weighted)
    mass = table.group_by(["test_id", "step"]).aggregate([("weighted", "sum")]).to_pandas()
    mass = mass.rename(columns={"weighted_sum": "mass"})
    mass = mass.sort_values(["test_id", "step"], ignore_index=True)
    total = mass.groupby("test_id")["mass"].transform("sum")
    mass["share"] = np.where(total > 0, mass["mass"] / total.where(total > 0, 1.0), np.nan)
    return mass[["test_id", "step", "mass", "share"]]


def peak_steps(
    results: RunResults, test_ids: Iterable[int] | None = None, weight: str = "abs"
) -> pd.DataFrame:
    """Return the loop step at which each test example's influence concentrates.

    The peak step is the step with the largest `step_mass`, the earliest one on ties.
    `peak_share` is its share of the example's total mass, between 1/tau (spread evenly)
    and 1 (all at one step). Columns: test_id, peak_step, peak_share, total_mass,
    test_text.

    NOTE: with sketched scores every |I_t| carries sketch noise, so `weight="abs"` adds
    a noise floor to every step; `weight="positive"` and a larger `sketch.dim` reduce it.
    """
    mass = step_mass(results, test_ids, weight)
    peaks = mass.loc[mass.groupby("test_id", sort=True)["mass"].idxmax()]
    totals = mass.groupby("test_id")["mass"].sum()
    frame = pd.DataFrame(
        {
            "test_id": peaks["test_id"].to_numpy(),
            "peak_step": peaks["step"].to_numpy().astype("int32"),
            "peak_share": peaks["share"].to_numpy(),
            "total_mass": totals.loc[peaks["test_id"]].to_numpy(),
        }
    )
    return _add_texts(results, frame)
