"""Prepare stage: generate a task's examples and write them as Parquet shards."""

from __future__ import annotations

import logging

import pyarrow as pa
from omegaconf import DictConfig

from operators.tasks import Example, make_task
from pipeline.data import DataError, check_examples, shard_from_table
from pipeline.run import Run
from pipeline.store import Store

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

    user_data = config.task.name == "parquet"
    tables = read_user_splits(config) if user_data else generate_splits(config)

    shards: dict[str, list[str]] = {}
    size = config.task.shard_size
    for split, table in tables.items():
        shards[split] = []
        for part, start in enumerate(range(0, table.num_rows, size)):
            path = run.data_shard(split, part)
            run.store.write_table(path, table.slice(start, size))
            shards[split].append(path)
        logger.info(
            "run %s: wrote %d %s examples in %d shards",
            run.name,
            table.num_rows,
            split,
            len(shards[split]),
        )

    run.store.write_json(manifest_path, {"stage": "prepare", "shards": shards})
    return shards


def generate_splits(config: DictConfig) -> dict[str, pa.Table]:
    """Generate the task's train and test examples, disjoint where the task can ensure it."""
    task = make_task(config.task)
    counts = [config.task.n_train, config.task.n_test]
    if hasattr(task, "generate_disjoint"):
        train, test = task.generate_disjoint(counts, config.task.seed)
    else:
        train = task.generate(counts[0], config.task.seed)
        test = task.generate(counts[1], config.task.seed + 1)
    return {"train": examples_table(train, 0), "test": examples_table(test, TEST_ID_OFFSET)}


def read_user_splits(config: DictConfig) -> dict[str, pa.Table]:
    """Read the user's train and test Parquet data and check it before anything is written.

    Rows without an `example_id` column get ids in file order (train from 0, test from
    1,000,000). Raises DataError naming the file for a missing column, an invalid example
    or an id used in both splits.
    """
    task = config.task
    tables = {
        "train": read_user_examples(task.train_path, config, first_id=0),
        "test": read_user_examples(task.test_path, config, first_id=TEST_ID_OFFSET),
    }
    shared = set(tables["train"].column("example_id").to_pylist()) & set(
        tables["test"].column("example_id").to_pylist()
    )
    if shared:
        raise DataError(
            f"example ids {sorted(shared)[:5]} appear in both {task.train_path} and "
            f"{task.test_path}; train and test ids must differ"
        )
    return tables


def read_user_examples(url: str, config: DictConfig, first_id: int) -> pa.Table:
    """Read one split from a Parquet file or a folder of them (sorted by name)."""
    source = Store(url, config.storage)
    single_file = source.fs.isfile(source.root)
    files = [""] if single_file else source.list("", suffix=".parquet")
    if not files:
        raise DataError(f"no Parquet files at {url}; point task.train_path/test_path at data")

    pieces = []
    for name in files:
        table = source.read_table(name)
        missing = {"input_ids", "targets"} - set(table.column_names)
        if missing:
            raise DataError(f"data file {source.display(name)} lacks columns {sorted(missing)}")
        pieces.append(table)
    table = pa.concat_tables(pieces, promote_options="permissive")
    if "example_id" not in table.column_names:
        ids = pa.array(range(first_id, first_id + table.num_rows), pa.int64())
        table = table.append_column("example_id", ids)
    table = table.select(DATA_SCHEMA.names).cast(DATA_SCHEMA)

    shard = shard_from_table(table, url, url)
    check_examples(shard, url, config.task.vocab_size, config.task.context_length)
    return table
