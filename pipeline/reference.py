"""The authors' reference package `step-decomposed-influence` (import name `sdi`) as a benchmark.

Optional: install with `pip install -e ".[reference]"`. Only `sdi validate` imports this
module, and only when the package is installed (or `validate.reference=true`). It runs the
reference's exact baseline (`FullGradientTracInSDI`, per-sample gradients from Opacus
grad samplers) and its projected estimator (`ProjectedTracInSDI`: TensorSketch and
CountSketch at `projection_size` buckets for every tensor, hashes from torch's generator)
on the same checkpoint weights and examples as our estimators.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from operators.batching import iter_batches
from operators.model import LoopedGPT, per_example_loss

logger = logging.getLogger(__name__)

REFERENCE_VERSION = "0.1.1"


def _loader(sample: Any, pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"ids": batch.input_ids, "targets": batch.targets, "mask": batch.attention_mask}
        for batch in iter_batches(sample.input_ids, sample.targets, pad_id, batch_size)
    ]


def reference_sdi(
    model: LoopedGPT, train: Any, test: Any, pad_id: int, reduction: str, settings: Any
) -> dict[tuple[str, int, int], np.ndarray]:
    """Return the reference's SDI (n_train, n_test, tau) for one checkpoint, with eta 1.

    Keys are (estimator, dim, seed): ("reference-exact", 0, 0) for the full-gradient
    baseline and ("reference-tensorsketch", dim, seed) for the projected estimator.
    """
    from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI

    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def load(_path: Any) -> dict[str, Any]:
        return {"model_state_dict": state}

    def loss_fn(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = module(batch["ids"], batch["mask"])
        return per_example_loss(logits, batch["targets"], reduction)

    train_loader = _loader(train, pad_id, settings.batch_size)
    test_loader = _loader(test, pad_id, settings.batch_size)
    checkpoints = [CheckpointSpec(path="in-memory", weight=1.0)]
    common = {
        "checkpoints": checkpoints,
        "train_loader": train_loader,
        "query_loader": test_loader,
        "loss_fn": loss_fn,
        "mode": "sdi",
        "load_checkpoint_fn": load,
    }

    results = {}
    estimators: list[tuple[tuple[str, int, int], Any]] = [
        (
            ("reference-exact", 0, 0),
            lambda: FullGradientTracInSDI(
                model=model, target_modules=model.body, loss_reduction="sum"
            ),
        )
    ]
    for dim in settings.dims:
        for seed in settings.seeds:
            estimators.append(
                (
                    ("reference-tensorsketch", int(dim), int(seed)),
                    lambda dim=dim, seed=seed: ProjectedTracInSDI(
                        model=model,
                        target_modules=model.body,
                        projection_size=int(dim),
                        seed=int(seed),
                        loss_reduction="sum",
                    ),
                )
            )
    for key, make in estimators:
        estimator = make()
        try:
            output = estimator.influence_across_checkpoints(**common)
        finally:
            estimator.close()
        results[key] = output.sdi.double().numpy()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return results
