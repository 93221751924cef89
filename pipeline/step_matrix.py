"""Step matrix (`sketch.step_matrix=true`): train step by test step scores.

M_st(z, z') = sum_k eta_k <phi_s(z), phi_t(z')>. The sketch stage then keeps one train
row per loop step (steps 1..tau instead of the single total row), and the reduce stage
writes `step_matrix/part-NNNNN.parquet` with one row per (test_id, train_id, train_step,
test_step). Summed over train steps the matrix equals SDI; the reduce stage checks that
for every shard and refuses to write a step matrix that does not conserve.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

CONSERVATION_TOLERANCE = 1e-5  # relative, float32 sketches summed in float64


class StepMatrixError(RuntimeError):
    """Step-matrix scores do not sum to SDI over train steps."""


def collapse_steps(example_ids: np.ndarray, steps: np.ndarray, values: np.ndarray):
    """Split per-step train rows into (ids, totals (n, D), per-step (n, tau, D)).

    Returns per-step None when the rows are already totals (step 0).
    """
    if int(steps.max()) == 0:
        return example_ids, values, None
    order = np.lexsort((steps, example_ids))
    ids = example_ids[order]
    unique = ids[:: int(steps.max())]
    tau = len(ids) // len(unique)
    per_step = values[order].reshape(len(unique), tau, -1)
    if not np.array_equal(
        steps[order].reshape(len(unique), tau), np.tile(np.arange(1, tau + 1), (len(unique), 1))
    ):
        raise StepMatrixError("train sketch rows do not hold steps 1..tau for every example")
    totals = per_step.astype(np.float64).sum(axis=1).astype(np.float32)
    return unique, totals, per_step


def step_products(per_step: np.ndarray, test_values: np.ndarray, eta: float) -> np.ndarray:
    """Return eta * <train step s, test row r> as float64 (n_train, tau, test rows)."""
    products = np.einsum("nsd,rd->nsr", per_step, test_values, dtype=np.float64)
    return products * eta


def step_matrix_table(
    matrix: np.ndarray,
    test_order: np.ndarray,
    train_ids: np.ndarray,
    test_ids: np.ndarray,
    scores: np.ndarray,
) -> pa.Table:
    """Arrange products (n_train, tau_s, test rows) as a tidy table and check conservation.

    `test_order` sorts the test rows by (test_id, step), as the reduce stage does, and
    `scores` is that shard's SDI (n_train, n_test, tau_t).
    """
    n_train, tau_train, _ = matrix.shape
    n_test, tau_test = len(test_ids), scores.shape[2]
    arranged = matrix[:, :, test_order].reshape(n_train, tau_train, n_test, tau_test)
    summed = arranged.sum(axis=1)
    error = np.linalg.norm(summed - scores) / max(np.linalg.norm(scores), 1e-300)
    if error > CONSERVATION_TOLERANCE:
        raise StepMatrixError(
            f"step matrix summed over train steps differs from SDI by {error:.2e} (relative); "
            "the train and test sketches do not match, re-run the sketch stage"
        )
    values = arranged.transpose(0, 2, 1, 3)  # (train, test, train_step, test_step)
    steps = np.arange(1, tau_train + 1, dtype=np.int32)
    return pa.table(
        {
            "test_id": np.tile(np.repeat(test_ids, tau_train * tau_test), n_train),
            "train_id": np.repeat(train_ids, n_test * tau_train * tau_test),
            "train_step": np.tile(np.repeat(steps, tau_test), n_train * n_test),
            "test_step": np.tile(
                np.arange(1, tau_test + 1, dtype=np.int32), n_train * n_test * tau_train
            ),
            "score": values.reshape(-1),
        }
    )
