"""One forward and one backward pass that turn a batch into per-example, per-step sketches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from operators.batching import Batch
from operators.capture import StepCapture, body_parameter_specs
from operators.model import per_example_loss
from operators.sketch import SketchAccumulator, SketchLayout


@dataclass
class SketchResult:
    """Sketches of one batch and the per-example losses they came from.

    `sketches` is (batch, tau, D) on the test side and (batch, 1, D) on the training side.
    Rows of examples whose loss is not finite are zero and marked False in `finite`.
    """

    sketches: torch.Tensor
    losses: torch.Tensor
    finite: torch.Tensor


def build_layout(
    body: nn.Module, method: str, dim: int, seed: int, path: str = "auto"
) -> SketchLayout:
    """Return the sketch layout of a body for one sketch configuration."""
    specs, _ = body_parameter_specs(body)
    return SketchLayout(specs, method, dim, seed, path)


def sketch_batch(
    model: nn.Module,
    body: nn.Module,
    tau: int,
    batch: Batch,
    layout: SketchLayout,
    per_step: bool,
    loss_reduction: str = "sum",
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor] = per_example_loss,
) -> SketchResult:
    """Sketch each example's body gradient, per loop step or summed over steps.

    Only activation gradients are computed (autograd is asked for the gradient of the
    body's first input, not of the weights), so no weight-gradient products are formed.
    The examples' gradients do not interact: the loss is a sum of per-example losses and
    attention never crosses examples. `autocast_dtype` (for example torch.bfloat16) runs
    the forward pass under autocast; sketches still accumulate in `dtype`. `loss_fn(logits,
    targets, reduction)` returns one loss per example.
    """
    device = batch.input_ids.device
    specs, module_specs = body_parameter_specs(body)
    accumulator = SketchAccumulator(layout, module_specs, len(batch), tau, per_step, device, dtype)

    with StepCapture(body, tau, accumulator) as capture:
        with torch.autocast(
            device_type=device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            logits = model(batch.input_ids, batch.attention_mask)
        # The loss (and its gradient at the logits) is computed in float32 or wider.
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        capture.check_forward()
        losses = loss_fn(logits, batch.targets, loss_reduction)
        finite = torch.isfinite(losses)
        total = torch.where(finite, losses, torch.zeros_like(losses)).sum()

        first_input = capture.first_input
        if first_input is not None and first_input.requires_grad:
            torch.autograd.grad(total, [first_input])
        else:
            parameters = [p for p in body.parameters() if p.requires_grad]
            torch.autograd.grad(total, parameters, allow_unused=True)

    sketches = accumulator.result()
    sketches[~finite] = 0.0
    return SketchResult(sketches, losses.detach(), finite)
