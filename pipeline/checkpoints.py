"""Checkpoints: safetensors weights plus a JSON record of config, learning rate and hash.

Loading reads only tensors and JSON, so it never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from operators.model import LoopedGPT, LoopedGPTConfig
from pipeline.run import Run
from pipeline.store import StoreError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or inconsistent."""


@dataclass
class CheckpointInfo:
    """What the pipeline needs to know about one checkpoint without loading its weights."""

    step: int
    lr: float | None
    content_hash: str
    path: str  # relative to the store root
    model_config: dict[str, Any]

    @property
    def checkpoint_id(self) -> int:
        return self.step


def content_hash(state: dict[str, torch.Tensor]) -> str:
    """Return a SHA-256 over parameter names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(
    run: Run, model: LoopedGPT, step: int, lr: float, extra: dict[str, Any]
) -> CheckpointInfo:
    """Write weights, then meta.json last, so a checkpoint without meta.json is incomplete."""
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    digest = content_hash(state)
    folder = run.checkpoint_dir(step)
    run.store.write_bytes(f"{folder}/model.safetensors", save_safetensors(state))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "lr": lr,
        "content_hash": digest,
        "model_config": model.config.to_dict(),
        **extra,
    }
    run.store.write_json(f"{folder}/meta.json", meta)
    logger.info("run %s: saved checkpoint step=%d lr=%.3g hash=%s", run.name, step, lr, digest[:12])
    return CheckpointInfo(step, lr, digest, folder, meta["model_config"])


def list_checkpoints(run: Run) -> list[CheckpointInfo]:
    """Return the run's complete checkpoints (those with meta.json), ordered by step."""
    infos = []
    for path in run.store.list(run.rel("checkpoints"), suffix="/meta.json"):
        meta = run.store.read_json(path)
        folder = path[: -len("/meta.json")]
        infos.append(
            CheckpointInfo(
                step=int(meta["step"]),
                lr=meta.get("lr"),
                content_hash=meta["content_hash"],
                path=folder,
                model_config=meta["model_config"],
            )
        )
    infos.sort(key=lambda info: info.step)
    return infos


def load_checkpoint(
    run: Run, info: CheckpointInfo, device: str | torch.device = "cpu"
) -> LoopedGPT:
    """Rebuild the model of a checkpoint and load its weights, checking the content hash."""
    try:
        data = run.store.read_bytes(f"{info.path}/model.safetensors")
    except StoreError as error:
        raise CheckpointError(
            f"checkpoint {run.store.display(info.path)} has no model.safetensors; re-run the "
            "train stage or remove the checkpoint folder"
        ) from error
    state = load_safetensors(data)
    digest = content_hash(state)
    if digest != info.content_hash:
        raise CheckpointError(
            f"checkpoint {run.store.display(info.path)} content hash {digest[:12]} does not match "
            f"meta.json ({info.content_hash[:12]}); the weights were changed after saving"
        )
    model = LoopedGPT(LoopedGPTConfig(**info.model_config))
    model.load_state_dict(state)
    return model.to(device).eval()
