"""Reduce stage: sketched inner products for all test/train pairs, per loop step.

For every train shard a Ray task computes, for each checkpoint k,
eta_k * train_sketch @ test_sketch.T in blocks of train rows (float32 matmul), sums over
checkpoints in float64, and writes that shard's `scores` and `tracin` parts and its
top-k candidates. The driver then merges the candidates into `topk`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from omegaconf import DictConfig

from pipeline import fingerprint as fp
from pipeline import step_matrix as sm
from pipeline.checkpoints import CheckpointInfo, list_checkpoints
from pipeline.progress import gather
from pipeline.run import Run
from pipeline.store import Store

logger = logging.getLogger(__name__)

ARROW_DTYPES = {"halffloat": "float16", "float": "float32", "double": "float64"}
TRACIN_STEP = 0  # `step` value of top-k rows ranked by TracIn (all steps together)


class EtaError(ValueError):
    """A checkpoint's learning rate is missing or invalid."""


@dataclass
class SketchMatrix:
    """Sketch rows read from Parquet: ids, steps and a dense float32 matrix."""

    example_ids: np.ndarray
    steps: np.ndarray
    values: np.ndarray  # (rows, D) float32
    fingerprint: dict[str, Any]
    source: str


def read_sketches(store: Store, paths: list[str]) -> SketchMatrix:
    """Read sketch files into one matrix, checking that their fingerprints agree.

    Sketches are read with pyarrow and reshaped from the flat list values, because
    pandas turns fixed-size lists into object columns.
    """
    ids, steps, blocks = [], [], []
    reference, reference_source = None, None
    for path in paths:
        table = store.read_table(path)
        source = store.display(path)
        fingerprint = fp.decode(table.schema.metadata or {}, source)
        if reference is None:
            reference, reference_source = fingerprint, source
        else:
            fp.check_compatible(reference, fingerprint, reference_source, source)
        column = table.column("sketch").combine_chunks()
        width = column.type.list_size
        stored = ARROW_DTYPES.get(str(column.type.value_type), str(column.type.value_type))
        if width != fingerprint.get("total_dim") or stored != fingerprint.get("dtype"):
            raise fp.FingerprintMismatchError(
                f"{source} stores {stored} sketches of dimension {width}, but its fingerprint "
                f"says {fingerprint.get('dtype')} of dimension {fingerprint.get('total_dim')}; "
                "re-run the sketch stage for this file"
            )
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        blocks.append(values.reshape(-1, width))
        ids.append(table.column("example_id").to_numpy())
        steps.append(table.column("step").to_numpy())
    if reference is None:
        raise FileNotFoundError("no sketch files to read")
    return SketchMatrix(
        np.concatenate(ids),
        np.concatenate(steps),
        np.concatenate(blocks),
        reference,
        reference_source,
    )


def checkpoint_eta(info: CheckpointInfo, override: float | None) -> float:
    """Return eta_k: the checkpoint's stored learning rate, or the explicit override."""
    if override is not None:
        return float(override)
    if info.lr is None or not np.isfinite(info.lr):
        raise EtaError(
            f"checkpoint {info.path} has no valid learning rate (lr={info.lr!r}); add lr to its "
            "meta.json or pass reduce.eta=VALUE to use one value for every checkpoint"
        )
    return float(info.lr)


def accumulate_products(
    total: torch.Tensor, train: np.ndarray, test: np.ndarray, eta: float, block_size: int
) -> None:
    """Add eta * train @ test.T to the float64 `total`, in float32 blocks of train rows.

    Each block's float32 product goes straight into its float64 rows (no full-size
    float32 or float64 temporaries), so memory beyond `total` is one block.
    """
    test_matrix = torch.from_numpy(np.array(test, dtype=np.float32, copy=True)).T
    train_matrix = torch.from_numpy(np.asarray(train, dtype=np.float32))
    for start in range(0, train_matrix.shape[0], block_size):
        block = train_matrix[start : start + block_size] @ test_matrix
        total[start : start + block_size].add_(block, alpha=eta)


def prefetched_sketches(store: Store, paths: list[str]) -> Iterator[SketchMatrix]:
    """Yield each file's sketches while the next file is read in a background thread.

    pyarrow's reader and torch's matmul both release the GIL, so reading checkpoint k+1
    overlaps the inner products of checkpoint k.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdi-prefetch") as pool:
        pending = pool.submit(read_sketches, store, [paths[0]]) if paths else None
        for index in range(len(paths)):
            current = pending.result()
            if index + 1 < len(paths):
                pending = pool.submit(read_sketches, store, [paths[index + 1]])
            yield current


def reduce_train_shard(
    store_spec: dict,
    run_name: str,
    part: int,
    train_paths: list[str],
    etas: list[float],
    topk: int,
    block_size: int,
    inputs: str,
    *tests: SketchMatrix,
) -> dict[str, Any]:
    """Score one train shard against every test example, step by step, over all checkpoints.

    `tests` contains one test sketch matrix per checkpoint; they come last so that Ray
    resolves them from the object store (it resolves only top-level arguments).
    """

    started = time.perf_counter()
    store = Store.from_spec(store_spec)
    run = Run(store, run_name)
    total = None
    train_ids = None
    matrix = None
    trains = prefetched_sketches(store, train_paths)
    for train, eta, test in zip(trains, etas, tests, strict=True):
        fp.check_compatible(test.fingerprint, train.fingerprint, test.source, train.source)
        # With sketch.step_matrix the train rows are per step; scores use their sum.
        train.example_ids, train.values, per_step = sm.collapse_steps(
            train.example_ids, train.steps, train.values
        )
        if per_step is not None:
            block = sm.step_products(per_step, test.values, eta)
            matrix = block if matrix is None else matrix + block
        if train_ids is None:
            train_ids = train.example_ids
        elif not np.array_equal(train_ids, train.example_ids):
            raise RuntimeError(
                f"{train.source} lists different train examples than the other checkpoints"
            )
        if total is None:
            total = torch.zeros(len(train.example_ids), len(test.example_ids), dtype=torch.float64)
        accumulate_products(total, train.values, test.values, eta, block_size)

    test = tests[0]
    test_ids = np.unique(test.example_ids)
    tau = int(test.steps.max())
    # Rows of the test matrix are (test_id, step); arrange scores as (train, test, step).
    order = np.lexsort((test.steps, test.example_ids))
    scores = total.numpy()[:, order].reshape(len(train_ids), len(test_ids), tau)

    n_train, n_test = len(train_ids), len(test_ids)
    step_table = pa.table(
        {
            "test_id": np.tile(np.repeat(test_ids, tau), n_train),
            "train_id": np.repeat(train_ids, n_test * tau),
            "step": np.tile(np.arange(1, tau + 1, dtype=np.int32), n_train * n_test),
            "score": scores.reshape(-1),
        }
    )
    tracin = scores.sum(axis=2)
    tracin_table = pa.table(
        {
            "test_id": np.tile(test_ids, n_train),
            "train_id": np.repeat(train_ids, n_test),
            "score": tracin.reshape(-1),
        }
    )
    metadata = fp.encode(score_fingerprint(tests, etas))
    store.write_table(
        run.rel("scores", f"part-{part:05d}.parquet"), step_table.replace_schema_metadata(metadata)
    )
    store.write_table(
        run.rel("tracin", f"part-{part:05d}.parquet"),
        tracin_table.replace_schema_metadata(metadata),
    )
    if matrix is not None:
        table = sm.step_matrix_table(matrix, order, train_ids, test_ids, scores)
        store.write_table(
            run.rel("step_matrix", f"part-{part:05d}.parquet"),
            table.replace_schema_metadata(metadata),
        )
    candidates = topk_candidates(scores, tracin, train_ids, test_ids, topk)
    store.write_table(
        run.rel("_work", "topk", f"part-{part:05d}.parquet"), pa.Table.from_pandas(candidates)
    )
    seconds = time.perf_counter() - started
    run.mark_done(
        "reduce",
        f"part={part:05d}",
        {"train_paths": train_paths, "inputs": inputs, "seconds": seconds},
    )
    logger.info(
        "run %s reduce part %d: %d train x %d test x %d steps in %.2fs",
        run_name,
        part,
        n_train,
        n_test,
        tau,
        seconds,
    )
    return {"part": part, "pairs": n_train * n_test, "seconds": seconds}


def topk_candidates(
    scores: np.ndarray, tracin: np.ndarray, train_ids: np.ndarray, test_ids: np.ndarray, k: int
) -> pd.DataFrame:
    """Return the k strongest proponents and opponents per (test, step) within one shard."""
    frames = []
    views = [(step + 1, scores[:, :, step]) for step in range(scores.shape[2])]
    views.append((TRACIN_STEP, tracin))
    for step, matrix in views:
        for direction, sign in (("proponent", 1.0), ("opponent", -1.0)):
            keep = min(k, matrix.shape[0])
            ranked = np.argsort(-sign * matrix, axis=0, kind="stable")[:keep]  # (keep, n_test)
            frames.append(
                pd.DataFrame(
                    {
                        "test_id": np.tile(test_ids, keep),
                        "step": step,
                        "direction": direction,
                        "train_id": train_ids[ranked].reshape(-1),
                        "score": np.take_along_axis(matrix, ranked, axis=0).reshape(-1),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def merge_topk(candidates: pd.DataFrame, k: int) -> pd.DataFrame:
    """Keep the k strongest rows per (test_id, step, direction) and number them from 1."""
    candidates = candidates.copy()
    candidates["strength"] = np.where(
        candidates["direction"] == "proponent", candidates["score"], -candidates["score"]
    )
    candidates = candidates.sort_values(
        ["test_id", "step", "direction", "strength", "train_id"],
        ascending=[True, True, True, False, True],
    )
    top = candidates.groupby(["test_id", "step", "direction"], sort=False).head(k).copy()
    top["rank"] = top.groupby(["test_id", "step", "direction"], sort=False).cumcount() + 1
    columns = ["test_id", "step", "direction", "rank", "train_id", "score"]
    return (
        top[columns]
        .reset_index(drop=True)
        .astype({"test_id": "int64", "train_id": "int64", "step": "int32", "rank": "int32"})
    )


def run_reduce(
    run: Run, config: DictConfig, shards: dict[str, list[str]], ray_module: Any
) -> dict[str, Any]:
    """Plan one Ray task per train shard, wait for them, then merge the top-k tables."""
    checkpoints = list_checkpoints(run)
    override = config.reduce.get("eta")
    etas = [checkpoint_eta(info, override) for info in checkpoints]
    inputs = reduce_inputs(run, config, checkpoints, etas, shards)
    manifest = run.manifest("reduce")
    topk_path = run.rel("topk", "part-00000.parquet")
    parts_done = all(
        run.is_done("reduce", f"part={part:05d}", {"inputs": inputs})
        for part in range(len(shards["train"]))
    )
    if (
        parts_done
        and run.is_done("reduce", "topk", {"inputs": inputs})
        and run.store.exists(topk_path)
    ):
        logger.info("run %s: reduce already complete for these inputs, skipping", run.name)
        parts = len(shards["train"])
        return {"parts": parts, "computed": 0, "skipped": parts}
    test_parts = len(shards["test"])
    tests = []
    for info in checkpoints:
        paths = [run.sketch_file(info.step, "test", part) for part in range(test_parts)]
        tests.append(read_sketches(run.store, paths))
    test_refs = [ray_module.put(test) for test in tests]

    remote = ray_module.remote(num_cpus=1)(reduce_train_shard)
    futures = []
    skipped = 0
    for part in range(len(shards["train"])):
        if run.is_done("reduce", f"part={part:05d}", {"inputs": inputs}) and run.store.exists(
            run.rel("scores", f"part-{part:05d}.parquet")
        ):
            skipped += 1
            continue
        train_paths = [run.sketch_file(info.step, "train", part) for info in checkpoints]
        futures.append(
            remote.remote(
                run.store.spec(),
                run.name,
                part,
                train_paths,
                etas,
                config.reduce.topk,
                config.reduce.block_size,
                inputs,
                *test_refs,
            )
        )
    results = gather(ray_module, futures, "reduce")

    parts = run.store.list(run.rel("_work", "topk"), suffix=".parquet")
    candidates = pd.concat(
        [run.store.read_table(path).to_pandas() for path in parts], ignore_index=True
    )
    topk = merge_topk(candidates, config.reduce.topk)
    topk_table = pa.Table.from_pandas(topk, preserve_index=False)
    metadata = (topk_table.schema.metadata or {}) | fp.encode(score_fingerprint(tests, etas))
    run.store.write_table(topk_path, topk_table.replace_schema_metadata(metadata))
    flagged = write_flagged(run, checkpoints, shards)
    run.mark_done("reduce", "topk", {"inputs": inputs})
    run.store.write_json(
        manifest,
        {
            "stage": "reduce",
            "parts": len(shards["train"]),
            "checkpoints": [c.step for c in checkpoints],
            "etas": etas,
            "inputs": inputs,
            "flagged": flagged,
            "topk": config.reduce.topk,
        },
    )
    return {"parts": len(shards["train"]), "computed": len(results), "skipped": skipped}


def score_fingerprint(tests: tuple | list, etas: list[float]) -> dict[str, Any]:
    """Return the fingerprint stored with score files: the sketches' one, for every checkpoint.

    The sketch fingerprint's single `checkpoint_hash` becomes `checkpoint_hashes`, one per
    checkpoint in the sum, next to the eta used for each.
    """
    fingerprint = dict(tests[0].fingerprint)
    fingerprint.pop("checkpoint_hash", None)
    fingerprint["checkpoint_hashes"] = [test.fingerprint.get("checkpoint_hash") for test in tests]
    fingerprint["etas"] = list(etas)
    return fingerprint


def reduce_inputs(
    run: Run,
    config: DictConfig,
    checkpoints: list[CheckpointInfo],
    etas: list[float],
    shards: dict[str, list[str]],
) -> str:
    """Return a digest of everything a reduce part depends on besides its own train shard.

    A new checkpoint, a new test shard, another eta or another top-k changes the digest,
    so the parts written for the old inputs are recomputed instead of skipped.
    """
    payload = {
        "checkpoints": [[info.step, info.content_hash] for info in checkpoints],
        "etas": etas,
        "test_shards": list(shards["test"]),
        "train_shards": list(shards["train"]),
        "topk": config.reduce.topk,
        "sketch": {key: config.sketch.get(key) for key in config.sketch},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


FLAGGED_SCHEMA = pa.schema(
    [("example_id", pa.int64()), ("split", pa.string()), ("checkpoint", pa.int64())]
)


def write_flagged(run: Run, checkpoints: list[CheckpointInfo], shards: dict[str, list[str]]) -> int:
    """Write `flagged/`: one row per (example, checkpoint) whose loss was NaN or infinite.

    Such an example's sketch is zero, so its scores are zero; every other score is
    unaffected. The rows come from the sketch stage's unit markers.
    """
    rows: dict[str, list] = {"example_id": [], "split": [], "checkpoint": []}
    for info in checkpoints:
        for split in ("test", "train"):
            for part in range(len(shards[split])):
                unit = f"checkpoint={info.step}.split={split}.part={part:05d}"
                marker = run.marker("sketch", unit)
                if not run.store.exists(marker):
                    continue
                for example_id in run.store.read_json(marker).get("non_finite", []):
                    rows["example_id"].append(int(example_id))
                    rows["split"].append(split)
                    rows["checkpoint"].append(info.step)
    if rows["example_id"]:
        logger.warning(
            "run %s: %d (example, checkpoint) pairs had a non-finite loss; see %s",
            run.name,
            len(rows["example_id"]),
            run.url("flagged"),
        )
    run.store.write_table(
        run.rel("flagged", "part-00000.parquet"), pa.table(rows, schema=FLAGGED_SCHEMA)
    )
    return len(rows["example_id"])
