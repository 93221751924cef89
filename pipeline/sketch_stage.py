"""Sketch stage (map): Ray actors stream data shards through each checkpoint.

A work unit is one (checkpoint, split, shard). Its output has a fixed key and is written
in one put, and its marker is written after it. A re-run skips units whose marker matches
the current fingerprint and redoes the rest, so a killed run resumes without duplicates.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from operators.batching import iter_batches
from operators.gradients import build_layout, sketch_batch
from operators.tasks import make_task
from pipeline import fingerprint as fp
from pipeline import sketch_cache
from pipeline.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint,
)
from pipeline.data import read_shard
from pipeline.devices import worker_device
from pipeline.models import ModelSpec, resolve_body, resolve_loss
from pipeline.run import Run
from pipeline.store import Store

logger = logging.getLogger(__name__)

STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
TRAIN_TOTAL_STEP = 0  # `step` value of a train-side row that contains the sum over steps
FLOAT16_MAX = 65504.0


class SketchOverflowError(ValueError):
    """A sketch value does not fit the storage dtype."""


@dataclass
class SketchUnit:
    """One work unit of the sketch stage."""

    checkpoint: int  # training step of the checkpoint
    checkpoint_path: str
    checkpoint_hash: str
    split: str
    part: int
    shard: str
    output: str

    @property
    def key(self) -> str:
        return f"checkpoint={self.checkpoint}.split={self.split}.part={self.part:05d}"


def sketch_table(
    example_ids: list[int],
    sketches: torch.Tensor,
    losses: torch.Tensor,
    finite: torch.Tensor,
    per_step: bool,
    dtype: str,
    fingerprint: dict[str, Any],
) -> pa.Table:
    """Build the Parquet table of one shard: a row per (example_id, step)."""
    count, rows, dim = sketches.shape
    steps = np.arange(1, rows + 1) if per_step else np.array([TRAIN_TOTAL_STEP])
    flat = sketches.detach().to(torch.float32).cpu().numpy().reshape(-1)
    if dtype == "float16":
        largest = float(np.abs(flat).max()) if flat.size else 0.0
        if largest > FLOAT16_MAX:
            raise SketchOverflowError(
                f"a sketch value of {largest:.4g} exceeds float16's largest value {FLOAT16_MAX} "
                f"(example ids {example_ids[0]}..{example_ids[-1]}); set sketch.dtype=float32"
            )
    values = pa.array(flat.astype(np.float16 if dtype == "float16" else np.float32))
    table = pa.table(
        {
            "example_id": pa.array(np.repeat(np.asarray(example_ids, np.int64), rows)),
            "step": pa.array(np.tile(steps, count).astype(np.int32)),
            "loss": pa.array(np.repeat(losses.detach().cpu().double().numpy(), rows)),
            "finite": pa.array(np.repeat(finite.cpu().numpy(), rows)),
            "sketch": pa.FixedSizeListArray.from_arrays(values, dim),
        }
    )
    return table.replace_schema_metadata(fp.encode(fingerprint))


class SketchWorker:
    """Holds one device and the most recent checkpoint; turns units into sketch files."""

    def __init__(self, store_spec: dict, config: dict, use_gpu: bool, threads: int) -> None:
        torch.set_num_threads(threads)
        self.store = Store.from_spec(store_spec)
        self.config = OmegaConf.create(config)
        self.run = Run(self.store, self.config.run_name)
        self.device = worker_device(use_gpu)
        self.task = make_task(self.config.task)
        self._loaded: tuple[str, Any, Any] | None = None

    def _model(self, unit: SketchUnit):
        if self._loaded is None or self._loaded[0] != unit.checkpoint_hash:
            meta = self.store.read_json(f"{unit.checkpoint_path}/meta.json")
            recorded = ModelSpec.from_checkpoint_meta(meta)
            info = CheckpointInfo(
                unit.checkpoint,
                None,
                unit.checkpoint_hash,
                unit.checkpoint_path,
                recorded.config,
                recorded.factory,
            )
            model = load_checkpoint(self.run, info, self.device)
            # The factory comes from the checkpoint; body, loss and tau from this run's config.
            spec = ModelSpec(
                recorded.factory,
                self.config.model.body,
                self.config.model.loss,
                self.config.model.tau,
                recorded.config,
            )
            body = resolve_body(model, spec.body)
            sketch = self.config.sketch
            layout = build_layout(body, sketch.method, sketch.dim, sketch.seed, sketch.path)
            self._loaded = (unit.checkpoint_hash, model, layout, spec, body)
            logger.info(
                "run %s: loaded checkpoint %d on %s", self.run.name, unit.checkpoint, self.device
            )
        return self._loaded[1:]

    def _restore_cached(self, unit: SketchUnit, started: float) -> dict | None:
        """Copy a train unit's sketch from the store's cache; None when it is not there."""
        if unit.split != "train":
            return None
        meta = self.store.read_json(f"{unit.checkpoint_path}/meta.json")
        shard_bytes = self.store.read_bytes(unit.shard)
        self._cache_key = sketch_cache.cache_key(
            unit.checkpoint_hash,
            {"config": meta["model_config"], "interface": meta.get("model")},
            shard_bytes,
            self.config.sketch,
            unit.split,
        )
        try:
            examples = pq.read_metadata(io.BytesIO(shard_bytes)).num_rows
        except (pa.ArrowInvalid, OSError):
            return None  # the compute path reads the shard and names the file
        table = sketch_cache.restore(self.store, self._cache_key, unit.output, examples)
        if table is None:
            return None
        seconds = time.perf_counter() - started
        fingerprint = fp.decode(table.schema.metadata or {}, self.store.display(unit.output))
        finite = table.column("finite").to_pylist()
        ids = table.column("example_id").to_pylist()
        record = {
            "output": unit.output,
            "rows": table.num_rows,
            "examples": examples,
            "seconds": seconds,
            "fingerprint": fingerprint,
            "non_finite": sorted({i for i, ok in zip(ids, finite, strict=True) if not ok}),
            "cache_key": self._cache_key,
            "cached": True,
        }
        self.run.mark_done("sketch", unit.key, record)
        logger.info(
            "run %s checkpoint %d train part %d: reused cached sketch %s",
            self.run.name,
            unit.checkpoint,
            unit.part,
            self._cache_key[:16],
        )
        return {"key": unit.key, "examples": examples, "seconds": seconds, "cached": True}

    def process(self, unit_fields: dict) -> dict:
        unit = SketchUnit(**unit_fields)
        started = time.perf_counter()
        self._cache_key = None
        cached = self._restore_cached(unit, started)
        if cached is not None:
            return cached
        model, layout, spec, body = self._model(unit)
        loss_fn = resolve_loss(spec.loss)
        sketch = self.config.sketch
        shard = read_shard(
            self.store, unit.shard, spec.config["vocab_size"], spec.config["context_length"]
        )
        per_step = unit.split == "test" or bool(sketch.get("step_matrix", False))
        autocast = getattr(torch, sketch.autocast) if sketch.autocast else None

        parts, losses, finite = [], [], []
        batches = iter_batches(shard.input_ids, shard.targets, self.task.pad_id, sketch.batch_size)
        for batch in batches:
            batch = batch.to(self.device)
            result = sketch_batch(
                model,
                body,
                spec.tau,
                batch,
                layout,
                per_step,
                sketch.loss_reduction,
                autocast_dtype=autocast,
                loss_fn=loss_fn,
            )
            parts.append(result.sketches.cpu())
            losses.append(result.losses.cpu())
            finite.append(result.finite.cpu())

        bad = [
            i for i, ok in zip(shard.example_ids, torch.cat(finite).tolist(), strict=True) if not ok
        ]
        if bad:
            logger.warning(
                "run %s checkpoint %d shard %s: non-finite loss for example ids %s; their "
                "sketches are zero and flagged finite=False",
                self.run.name,
                unit.checkpoint,
                unit.shard,
                bad[:10],
            )
        fingerprint = fp.sketch_fingerprint(
            layout,
            spec.to_dict(),
            unit.checkpoint_hash,
            sketch.loss_reduction,
            sketch.dtype,
            spec.tau,
        )
        table = sketch_table(
            shard.example_ids,
            torch.cat(parts),
            torch.cat(losses),
            torch.cat(finite),
            per_step,
            sketch.dtype,
            fingerprint,
        )
        self.store.write_table(unit.output, table)
        if self._cache_key is not None:
            sketch_cache.save(self.store, self._cache_key, table)
        seconds = time.perf_counter() - started
        record = {
            "output": unit.output,
            "rows": table.num_rows,
            "examples": len(shard),
            "seconds": seconds,
            "fingerprint": fingerprint,
            "non_finite": bad,
            "cache_key": self._cache_key,
            "cached": False,
            "per_step": per_step,
        }
        self.run.mark_done("sketch", unit.key, record)
        logger.info(
            "run %s checkpoint %d %s part %d: %d examples in %.2fs",
            self.run.name,
            unit.checkpoint,
            unit.split,
            unit.part,
            len(shard),
            seconds,
        )
        return {"key": unit.key, "examples": len(shard), "seconds": seconds, "cached": False}


def plan_units(
    run: Run, checkpoints: list[CheckpointInfo], shards: dict[str, list[str]]
) -> list[SketchUnit]:
    """List every (checkpoint, split, shard) unit, checkpoint-major so actors reuse a loaded model."""
    units = []
    for info in checkpoints:
        for split in ("test", "train"):
            for part, shard in enumerate(shards[split]):
                units.append(
                    SketchUnit(
                        checkpoint=info.step,
                        checkpoint_path=info.path,
                        checkpoint_hash=info.content_hash,
                        split=split,
                        part=part,
                        shard=shard,
                        output=run.sketch_file(info.step, split, part),
                    )
                )
    return units


def pending_units(run: Run, units: list[SketchUnit], config: DictConfig) -> list[SketchUnit]:
    """Drop the units whose marker records the same output and checkpoint hash."""
    pending = []
    for unit in units:
        marker = run.marker("sketch", unit.key)
        if run.store.exists(marker) and run.store.exists(unit.output):
            record = run.store.read_json(marker)
            fingerprint = record.get("fingerprint", {})
            if (
                fingerprint.get("checkpoint_hash") == unit.checkpoint_hash
                and fingerprint.get("sketch_dim") == config.sketch.dim
                and fingerprint.get("sketch_method") == config.sketch.method
                and fingerprint.get("sketch_seed") == config.sketch.seed
                and fingerprint.get("dtype") == config.sketch.dtype
                and fingerprint.get("loss_reduction") == config.sketch.loss_reduction
                and record.get("per_step", unit.split == "test")
                == (unit.split == "test" or bool(config.sketch.get("step_matrix", False)))
            ):
                continue
        pending.append(unit)
    return pending


def run_sketch(
    run: Run, config: DictConfig, shards: dict[str, list[str]], pool: Any
) -> dict[str, Any]:
    """Sketch every pending unit on the actor pool and write the stage manifest last."""
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise CheckpointError(
            f"run {run.name}: no checkpoints under {run.url('checkpoints')}; run the train stage first"
        )
    warn_duplicate_checkpoints(run, checkpoints)
    units = plan_units(run, checkpoints, shards)
    pending = pending_units(run, units, config)
    logger.info("run %s: sketch stage has %d units, %d pending", run.name, len(units), len(pending))
    results = pool.map([asdict(unit) for unit in pending]) if pending else []
    manifest = {
        "stage": "sketch",
        "units": [unit.key for unit in units],
        "checkpoints": [info.step for info in checkpoints],
    }
    unchanged = not results and run.store.exists(run.manifest("sketch"))
    if not unchanged or run.store.read_json(run.manifest("sketch")) != manifest:
        run.store.write_json(run.manifest("sketch"), manifest)
    reused = sum(1 for result in results if result.get("cached"))
    return {"units": len(units), "computed": len(results) - reused, "reused": reused}


def warn_duplicate_checkpoints(run: Run, checkpoints: list[CheckpointInfo]) -> None:
    """Warn when two checkpoints hold identical weights: TracIn then counts them twice."""
    seen: dict[str, int] = {}
    for info in checkpoints:
        if info.content_hash in seen:
            logger.warning(
                "run %s: checkpoints step=%d and step=%d have identical content (hash %s); "
                "both enter the sum over checkpoints. Remove one unless that is intended",
                run.name,
                seen[info.content_hash],
                info.step,
                info.content_hash[:12],
            )
        else:
            seen[info.content_hash] = info.step
