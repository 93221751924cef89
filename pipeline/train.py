"""Train stage: AdamW with linear warm-up and cosine decay, checkpoints at chosen steps."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from operators.batching import collate, iter_batches
from operators.capture import body_parameter_specs
from operators.model import LoopedGPTConfig
from operators.tasks import make_task
from operators.tasks.base import IGNORE_INDEX
from pipeline.checkpoints import save_checkpoint
from pipeline.data import Shard, read_shard
from pipeline.models import build_model, model_spec, resolve_body, resolve_loss
from pipeline.run import Run

logger = logging.getLogger(__name__)


def model_config(config: DictConfig) -> LoopedGPTConfig:
    """Return the model shape for a pipeline configuration (vocabulary and context from the task)."""
    task = make_task(config.task)
    return LoopedGPTConfig(
        vocab_size=task.vocab_size,
        context_length=task.context_length,
        **OmegaConf.to_container(config.model),
    )


def learning_rate(step: int, config: DictConfig) -> float:
    """Return the learning rate used for the update at `step` (1-based)."""
    train = config.train
    if train.warmup_steps > 0 and step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def checkpoint_steps(config: DictConfig) -> list[int]:
    """Return the sorted training steps at which checkpoints are saved."""
    train = config.train
    steps = sorted(set(train.checkpoint_steps)) if train.checkpoint_steps else []
    if not steps:
        count = max(1, train.num_checkpoints)
        steps = sorted({round(train.steps * (i + 1) / count) for i in range(count)})
    bad = [s for s in steps if not 1 <= s <= train.steps]
    if bad:
        raise ValueError(f"train.checkpoint_steps {bad} lie outside 1..train.steps={train.steps}")
    return steps


def evaluate(
    model: nn.Module, shards: list[Shard], pad_id: int, device: torch.device
) -> dict[str, float]:
    """Return token accuracy over target positions and sequence accuracy (all targets right)."""
    correct_tokens = total_tokens = correct_sequences = total_sequences = 0
    model.eval()
    with torch.no_grad():
        for shard in shards:
            for batch in iter_batches(shard.input_ids, shard.targets, pad_id, 256):
                batch = batch.to(device)
                predictions = model(batch.input_ids, batch.attention_mask).argmax(dim=-1)
                mask = batch.targets != IGNORE_INDEX
                hits = (predictions == batch.targets) & mask
                correct_tokens += int(hits.sum())
                total_tokens += int(mask.sum())
                correct_sequences += int((hits.sum(1) == mask.sum(1)).sum())
                total_sequences += len(batch)
    return {
        "token_accuracy": correct_tokens / max(1, total_tokens),
        "sequence_accuracy": correct_sequences / max(1, total_sequences),
    }


def train_model(
    run: Run, config: DictConfig, shard_paths: dict[str, list[str]], device: torch.device
) -> dict[str, Any]:
    """Train on the train split, save checkpoints, and return accuracies on both splits."""
    started = time.perf_counter()
    task = make_task(config.task)
    spec = model_spec(config)
    torch.manual_seed(config.train.seed)
    model = build_model(spec).to(device)
    # Fail before training when the body path is wrong or its parameters cannot be captured.
    body_parameter_specs(resolve_body(model, spec.body))
    loss_fn = resolve_loss(spec.loss)

    vocab_size, context_length = spec.config["vocab_size"], spec.config["context_length"]
    shards = {
        split: [read_shard(run.store, path, vocab_size, context_length) for path in paths]
        for split, paths in shard_paths.items()
    }
    ids = [seq for shard in shards["train"] for seq in shard.input_ids]
    targets = [seq for shard in shards["train"] for seq in shard.targets]
    if not ids:
        raise ValueError(f"run {run.name}: the train split is empty; raise task.n_train")
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        betas=(0.9, 0.98),
    )
    generator = torch.Generator().manual_seed(config.train.seed)
    saves = checkpoint_steps(config)
    saved = []

    for step in range(1, config.train.steps + 1):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(0, len(ids), (config.train.batch_size,), generator=generator).tolist()
        batch = collate([ids[r] for r in rows], [targets[r] for r in rows], task.pad_id).to(device)
        model.train()
        logits = model(batch.input_ids, batch.attention_mask)
        count = (batch.targets != IGNORE_INDEX).sum().clamp(min=1)
        loss = loss_fn(logits, batch.targets, "sum").sum() / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        if step % 50 == 0 or step == 1:
            logger.info("run %s: train step %d loss %.4f lr %.3g", run.name, step, loss.item(), lr)
        if step in saves:
            info = save_checkpoint(
                run, model, step, lr, {"task": OmegaConf.to_container(config.task)}, spec
            )
            saved.append(info.step)

    metrics = {
        split: evaluate(model, split_shards, task.pad_id, device)
        for split, split_shards in shards.items()
    }
    metrics["checkpoints"] = saved
    metrics["seconds"] = time.perf_counter() - started
    run.store.write_json(run.rel("train", "metrics.json"), metrics)
    run.store.write_json(run.manifest("train"), {"stage": "train", "checkpoints": saved})
    return metrics
