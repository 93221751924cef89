"""Scores recomputed from the stored sketches: self-influence and per-checkpoint SDI.

The reduce stage stores only the sum over checkpoints. Per-checkpoint scores are
recomputed here on demand for the requested test examples instead of being written for
every pair. Each query costs one pass over the train sketches, but the store keeps one
`scores` table, where a stored per-checkpoint table would be K times larger.

Sketches are read with pyarrow (`reduce_stage.read_sketches`), because pandas turns
fixed-size lists into object columns, and their fingerprints are checked the same way
the reduce stage checks them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline import fingerprint as fp
from pipeline.analysis.results import RunResults
from pipeline.progress import progress
from pipeline.reduce_stage import SketchMatrix, read_sketches

logger = logging.getLogger(__name__)


def _train_totals(sketch: SketchMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Return (example_ids, one total sketch per example) from a train sketch matrix.

    Train files hold one row per example with step 0, the sketch of the gradient summed
    over loop steps. Should a file hold one row per step instead, the rows are summed:
    a sketch is linear, so the sum of step sketches is the sketch of the summed gradient.
    """
    ids, inverse = np.unique(sketch.example_ids, return_inverse=True)
    if len(ids) == len(sketch.example_ids):
        order = np.argsort(sketch.example_ids, kind="stable")
        return sketch.example_ids[order], sketch.values[order].astype(np.float64)
    totals = np.zeros((len(ids), sketch.values.shape[1]), dtype=np.float64)
    np.add.at(totals, inverse, sketch.values)
    return ids, totals


def self_influence(
    results: RunResults,
    checkpoints: list[int] | None = None,
    by_checkpoint: bool = False,
) -> pd.DataFrame:
    """Return the self-influence sum_k eta_k <S(g_k(z)), S(g_k(z))> of every train example.

    g_k(z) is the body gradient of train example z at checkpoint k and S its sketch.
    Large values mark examples that the model keeps fitting against its own gradient:
    mislabelled or atypical examples rank high. Columns: train_id, self_influence, rank
    (1 = largest), mean_loss (over the selected checkpoints), train_text. With
    `by_checkpoint=True` the frame has one row per (checkpoint, train_id) with `eta`,
    that checkpoint's term and its `loss` instead.

    The sketched squared norm has no bias: E||S(g)||^2 = ||g||^2 for CountSketch and
    TensorSketch, because the cross terms g_i g_j s_i s_j of colliding coordinates have
    random signs with mean zero. What it has is variance: the relative standard error
    per tensor is about sqrt(2/m) for m buckets with CountSketch (3% at m=2048) and a
    little more with TensorSketch. The maximum of many such estimates is biased upward,
    so the top of the ranking overstates its values a little. Exact mode
    (`sketch.method=exact`) has no error at all.
    """
    selected = results.select_checkpoints(checkpoints)
    units = [
        (int(row.checkpoint), float(row.eta), path)
        for row in selected.itertuples()
        for path in results.sketch_paths(int(row.checkpoint), "train")
    ]
    parts = []
    reference = None
    for checkpoint, eta, path in progress(units, "self-influence", total=len(units)):
        sketch = read_sketches(results.run.store, [path])
        if reference is None:
            reference = sketch
        else:
            # Runs of one configuration share hash tables across checkpoints; the
            # checkpoint hash itself differs, so compare the other fields only.
            fp.check_compatible(
                {**reference.fingerprint, "checkpoint_hash": None},
                {**sketch.fingerprint, "checkpoint_hash": None},
                reference.source,
                sketch.source,
            )
        ids, totals = _train_totals(sketch)
        losses = _train_losses(results, path)
        parts.append(
            pd.DataFrame(
                {
                    "checkpoint": checkpoint,
                    "eta": eta,
                    "train_id": ids,
                    "self_influence": eta * np.einsum("ij,ij->i", totals, totals),
                    "loss": losses.reindex(ids).to_numpy(),
                }
            )
        )
    per_checkpoint = pd.concat(parts, ignore_index=True)
    if by_checkpoint:
        per_checkpoint = per_checkpoint.sort_values(["checkpoint", "train_id"], ignore_index=True)
        per_checkpoint["train_text"] = results.text(per_checkpoint["train_id"])
        return per_checkpoint

    grouped = per_checkpoint.groupby("train_id")
    frame = grouped["self_influence"].sum().reset_index()
    frame["mean_loss"] = frame["train_id"].map(grouped["loss"].mean())
    frame = frame.sort_values(["self_influence", "train_id"], ascending=[False, True])
    frame = frame.reset_index(drop=True)
    frame.insert(2, "rank", np.arange(1, len(frame) + 1, dtype=np.int32))
    frame["train_text"] = results.text(frame["train_id"])
    return frame


def _train_losses(results: RunResults, path: str) -> pd.Series:
    table = results.run.store.read_table(path, columns=["example_id", "loss"])
    frame = table.to_pandas().drop_duplicates("example_id")
    return frame.set_index("example_id")["loss"]


def checkpoint_scores(
    results: RunResults,
    test_ids: Iterable[int],
    checkpoints: list[int] | None = None,
    train_ids: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Return the SDI terms of each checkpoint: eta_k <S(g_k(z)), S(phi_t,k(z'))>.

    Computed from the sketches for the given test examples (and train examples, all by
    default) at the selected checkpoints. Summed over checkpoints these rows equal the
    run's `scores` table. Columns: checkpoint, eta, test_id, train_id, step, score,
    test_text, train_text.
    """
    requested_tests = sorted({int(t) for t in test_ids})
    if not requested_tests:
        raise ValueError("test_ids is empty; pass at least one test example id")
    requested_train = None if train_ids is None else np.array(sorted({int(t) for t in train_ids}))
    selected = results.select_checkpoints(checkpoints)

    frames = []
    for row in selected.itertuples():
        checkpoint, eta = int(row.checkpoint), float(row.eta)
        test = read_sketches(results.run.store, results.sketch_paths(checkpoint, "test"))
        keep = np.isin(test.example_ids, requested_tests)
        missing = sorted(set(requested_tests) - set(test.example_ids[keep].tolist()))
        if missing:
            raise KeyError(
                f"test_ids {missing[:10]} have no sketches at checkpoint {checkpoint} "
                f"in run {results.url}"
            )
        test_values = test.values[keep].astype(np.float64)
        test_ids_rows, test_steps = test.example_ids[keep], test.steps[keep]

        paths = results.sketch_paths(checkpoint, "train")
        for path in progress(paths, f"checkpoint {checkpoint}", total=len(paths)):
            train = read_sketches(results.run.store, [path])
            fp.check_compatible(test.fingerprint, train.fingerprint, test.source, train.source)
            ids, totals = _train_totals(train)
            if requested_train is not None:
                mask = np.isin(ids, requested_train)
                ids, totals = ids[mask], totals[mask]
            if len(ids) == 0:
                continue
            products = eta * (totals @ test_values.T)  # (train rows, test rows)
            frames.append(
                pd.DataFrame(
                    {
                        "checkpoint": checkpoint,
                        "eta": eta,
                        "test_id": np.tile(test_ids_rows, len(ids)),
                        "train_id": np.repeat(ids, len(test_ids_rows)),
                        "step": np.tile(test_steps, len(ids)).astype(np.int32),
                        "score": products.reshape(-1),
                    }
                )
            )
    if not frames:
        shown = "all" if requested_train is None else requested_train.tolist()[:10]
        raise KeyError(f"train_ids {shown} have no sketches in run {results.url}")
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.sort_values(["checkpoint", "test_id", "train_id", "step"], ignore_index=True)
    frame["test_text"] = results.text(frame["test_id"])
    frame["train_text"] = results.text(frame["train_id"])
    return frame
