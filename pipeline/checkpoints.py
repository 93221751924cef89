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
from torch import nn

from pipeline.models import DEFAULT_FACTORY, ModelSpec, build_model
from pipeline.run import Run
from pipeline.store import StoreError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or inconsistent."""


@dataclass
class CheckpointInfo:
    """Metadata of one checkpoint, read without loading its weights."""

    step: int
    lr: float | None
    content_hash: str
    path: str  # relative to the store root
    model_config: dict[str, Any]  # the dict the factory is called with
    factory: str = DEFAULT_FACTORY  # import path of the model factory

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
    run: Run,
    model: nn.Module,
    step: int,
    lr: float,
    extra: dict[str, Any],
    spec: ModelSpec | None = None,
) -> CheckpointInfo:
    """Write weights, then meta.json last, so a checkpoint without meta.json is incomplete.

    `spec` records the factory, body, loss and tau that rebuild the model; without it the
    model must be a LoopedGPT, whose own config is recorded.
    """
    if spec is None:
        spec = ModelSpec(tau=model.config.tau, config=model.config.to_dict())
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
        "model_config": spec.config,
        "model": {"factory": spec.factory, "body": spec.body, "loss": spec.loss, "tau": spec.tau},
        **extra,
    }
    run.store.write_json(f"{folder}/meta.json", meta)
    logger.info("run %s: saved checkpoint step=%d lr=%.3g hash=%s", run.name, step, lr, digest[:12])
    return CheckpointInfo(step, lr, digest, folder, meta["model_config"], spec.factory)


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
                factory=ModelSpec.from_checkpoint_meta(meta).factory,
            )
        )
    infos.sort(key=lambda info: info.step)
    return infos


def load_checkpoint(
    run: Run, info: CheckpointInfo, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild the model of a checkpoint and load its weights, checking the content hash.

    The model comes from calling the recorded factory with the recorded model config; the
    weights come from safetensors, so nothing is unpickled.
    """
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
    model = build_model(ModelSpec(factory=info.factory, config=dict(info.model_config)))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {run.store.display(info.path)} does not fit the model that "
            f"{info.factory} builds from its recorded config: {error}"
        ) from error
    return model.to(device).eval()
