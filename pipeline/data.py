"""Reading and validating prepared data shards."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from operators.tasks.base import IGNORE_INDEX
from pipeline.store import Store


class DataError(ValueError):
    """A data shard contains examples the model cannot take."""


@dataclass
class Shard:
    """The examples of one Parquet data shard."""

    path: str
    example_ids: list[int]
    input_ids: list[list[int]]
    targets: list[list[int]]

    def __len__(self) -> int:
        return len(self.example_ids)


def read_shard(store: Store, path: str, vocab_size: int, context_length: int) -> Shard:
    """Read a data shard and check every example against the model's vocabulary and context.

    Raises DataError naming the file and example id for: a missing column, an empty
    example, a length mismatch between tokens and targets, a token id or target outside
    the vocabulary, or a sequence longer than the context.
    """
    table = store.read_table(path)
    shard = shard_from_table(table, path, store.display(path))
    check_examples(shard, store.display(path), vocab_size, context_length)
    return shard


def shard_from_table(table: pa.Table, path: str, display: str) -> Shard:
    """Return the examples of a table with example_id, input_ids and targets columns."""
    missing = {"example_id", "input_ids", "targets"} - set(table.column_names)
    if missing:
        raise DataError(f"data file {display} lacks columns {sorted(missing)}")
    if table.num_rows == 0:
        raise DataError(f"data file {display} has no examples; remove it or add examples")
    return Shard(
        path=path,
        example_ids=table.column("example_id").to_pylist(),
        input_ids=table.column("input_ids").to_pylist(),
        targets=table.column("targets").to_pylist(),
    )


def check_examples(shard: Shard, display: str, vocab_size: int, context_length: int) -> None:
    """Raise DataError for the first example the model cannot take, naming file and id."""
    for example_id, ids, targets in zip(
        shard.example_ids, shard.input_ids, shard.targets, strict=True
    ):
        where = f"example_id={example_id} in {display}"
        if example_id is None:
            raise DataError(f"an example in {display} has no example_id; give every row an id")
        if not ids:
            raise DataError(f"{where} has no tokens; drop it or give it at least one token")
        if targets is None or len(targets) != len(ids):
            raise DataError(f"{where} has {len(ids)} tokens but {len(targets or [])} targets")
        if len(ids) > context_length:
            raise DataError(
                f"{where} has {len(ids)} tokens, more than the context length {context_length}; "
                "truncate it or raise the model's context length"
            )
        bad_tokens = [t for t in ids if t is None or not 0 <= t < vocab_size]
        if bad_tokens:
            raise DataError(
                f"{where} has token ids {bad_tokens[:5]} outside the vocabulary [0, {vocab_size})"
            )
        bad_targets = [
            t for t in targets if t is None or (t != IGNORE_INDEX and not 0 <= t < vocab_size)
        ]
        if bad_targets:
            raise DataError(
                f"{where} has targets {bad_targets[:5]} outside the vocabulary [0, {vocab_size}) "
                f"and not the ignore value {IGNORE_INDEX}"
            )
    if len(set(shard.example_ids)) != len(shard.example_ids):
        raise DataError(f"data file {display} repeats example ids; ids must be unique")
