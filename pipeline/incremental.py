"""Add examples to a prepared run, so that a re-run sketches only the new shard.

The prepare stage writes a run's data once. New test (or train) examples go into a new
shard with the next part number, and the prepare manifest lists it last. Existing shards
and their sketches stay untouched: the next `sdi run` computes the new shard's sketches
for every checkpoint, reuses everything else, and recomputes the scores.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from pipeline.data import DataError
from pipeline.prepare import DATA_SCHEMA, SPLITS
from pipeline.run import Run

logger = logging.getLogger(__name__)


def add_examples(run: Run, split: str, examples: pa.Table) -> str:
    """Write `examples` (example_id, input_ids, targets) as the split's next shard.

    Raises DataError when the table is empty, lacks a column, or reuses an example id
    that the run already has in either split. Returns the new shard's path.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r} is invalid; use one of {SPLITS}")
    missing = {"example_id", "input_ids", "targets"} - set(examples.column_names)
    if missing:
        raise DataError(f"new {split} examples lack columns {sorted(missing)}")
    if examples.num_rows == 0:
        raise DataError(f"no new {split} examples given; nothing to add")
    manifest_path = run.manifest("prepare")
    if not run.store.exists(manifest_path):
        raise DataError(f"run {run.url()} has no prepared data; run the prepare stage first")
    manifest = run.store.read_json(manifest_path)
    shards: dict[str, list[str]] = manifest["shards"]

    new_ids = examples.column("example_id").to_pylist()
    if len(set(new_ids)) != len(new_ids):
        raise DataError(f"new {split} examples repeat example ids; ids must be unique")
    existing: set[int] = set()
    for path in shards["train"] + shards["test"]:
        existing.update(run.store.read_table(path, columns=["example_id"]).column(0).to_pylist())
    duplicates = sorted(existing.intersection(new_ids))
    if duplicates:
        raise DataError(
            f"example ids {duplicates[:5]} are already in run {run.name}; give new examples new ids"
        )

    path = run.data_shard(split, len(shards[split]))
    run.store.write_table(path, examples.select(DATA_SCHEMA.names).cast(DATA_SCHEMA))
    shards[split] = [*shards[split], path]
    run.store.write_json(manifest_path, {**manifest, "shards": shards})
    logger.info("run %s: added %d %s examples as %s", run.name, len(new_ids), split, path)
    return path
