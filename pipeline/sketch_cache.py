"""A content-addressed cache of train sketches shared by every run in one store.

A train sketch depends only on the checkpoint's weights and model shape, the data shard's
bytes and the sketch settings. Its cache key is a digest of exactly those, so any run
whose train unit has the same key (another run name, a run with more test examples, a
re-run after overwrite) copies the stored file instead of recomputing it. A key never
names anything that could change the sketch without changing the key, so the cache needs
no invalidation; deleting `<store>/_sketch_cache/` only costs recomputation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators import __version__ as code_version
from pipeline.store import Store, StoreError

logger = logging.getLogger(__name__)

# NOTE: each cached train sketch is stored twice (here and in its run), and nothing prunes
# entries of checkpoints no run uses any more.
CACHE_FOLDER = "_sketch_cache"
# Sketch settings that change a sketch's bytes. Batch size is included because floating
# point sums over a batch may round differently; the guarantee is byte-identical output.
SETTINGS = ("method", "dim", "seed", "path", "dtype", "loss_reduction", "batch_size", "autocast")


def cache_key(
    checkpoint_hash: str,
    model_config: dict[str, Any],
    shard_bytes: bytes,
    sketch: Any,
    split: str,
) -> str:
    """Return the digest naming one shard's sketch under one checkpoint and sketch setting."""
    payload = {
        "checkpoint_hash": checkpoint_hash,
        "model_config": model_config,
        "shard_sha256": hashlib.sha256(shard_bytes).hexdigest(),
        "sketch": {name: sketch.get(name) for name in SETTINGS},
        "split": split,
        "code_version": code_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(key: str) -> str:
    return f"{CACHE_FOLDER}/{key[:2]}/{key}.parquet"


def restore(store: Store, key: str, output: str, examples: int) -> pa.Table | None:
    """Copy a cached sketch file to `output` and return its table, or None on a miss.

    A cached file that is unreadable or contains the wrong number of examples is ignored
    (and later overwritten) rather than trusted.
    """
    path = cache_path(key)
    if not store.exists(path):
        return None
    try:
        data = store.read_bytes(path)
        table = pq.read_table(io.BytesIO(data))
    except (StoreError, pa.ArrowInvalid, OSError) as error:
        logger.warning("sketch cache entry %s is unreadable (%s); recomputing", key[:16], error)
        return None
    if len(set(table.column("example_id").to_pylist())) != examples:
        logger.warning("sketch cache entry %s does not match its shard; recomputing", key[:16])
        return None
    store.write_bytes(output, data)
    return table


def save(store: Store, key: str, table: pa.Table) -> None:
    store.write_table(cache_path(key), table)
