"""Prepare stage: generate a task's examples and write them as Parquet shards."""

from __future__ import annotations

import logging

import pyarrow as pa
from omegaconf import DictConfig

from operators.tasks import Example, make_task
from pipeline.run import Run

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
DATA_SCHEMA = pa.schema(
    [
        ("example_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("targets", pa.list_(pa.int32())),
    ]
)
# Test example ids start here so that train and test ids never collide.
TEST_ID_OFFSET = 1_000_000


def examples_table(examples: list[Example], first_id: int) -> pa.Table:
    return pa.table(
        {
            "example_id": pa.array(range(first_id, first_id + len(examples)), pa.int64()),
            "input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
            "targets": pa.array([e.targets for e in examples], pa.list_(pa.int32())),
        },
        schema=DATA_SCHEMA,
    )


def run_prepare(run: Run, config: DictConfig) -> dict[str, list[str]]:
    """Write train and test shards; skip when the stage's manifest already exists."""
    manifest_path = run.manifest("prepare")
    if run.store.exists(manifest_path):
        logger.info("run %s: prepare already complete, skipping", run.name)
        return run.store.read_json(manifest_path)["shards"]

    task = make_task(config.task)
    counts = [config.task.n_train, config.task.n_test]
    if hasattr(task, "generate_disjoint"):
        train, test = task.generate_disjoint(counts, config.task.seed)
    else:
        train = task.generate(counts[0], config.task.seed)
        test = task.generate(counts[1], config.task.seed + 1)

    shards: dict[str, list[str]] = {}
    for split, examples, first_id in (("train", train, 0), ("test", test, TEST_ID_OFFSET)):
        shards[split] = []
        size = config.task.shard_size
        for part, start in enumerate(range(0, len(examples), size)):
            path = run.data_shard(split, part)
            run.store.write_table(
                path, examples_table(examples[start : start + size], first_id + start)
            )
            shards[split].append(path)
        logger.info(
            "run %s: wrote %d %s examples in %d shards",
            run.name,
            len(examples),
            split,
            len(shards[split]),
        )

    run.store.write_json(manifest_path, {"stage": "prepare", "shards": shards})
    return shards
