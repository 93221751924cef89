"""The ways to turn one batch into train-side and test-side gradient features.

Each builder returns a function that processes one batch on both sides (train: one
feature per example; test: one per example and loop step), as the sketch stage does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import functional_call, grad, vmap

from benchmarks.common import Shape, make_batch, make_model
from operators.gradients import build_layout, sketch_batch
from operators.model import per_example_loss

# Dense projections bigger than this are not built; the method is recorded as infeasible.
DENSE_PROJECTION_BYTES = 2 << 30


class Infeasible(RuntimeError):
    """The method cannot run at this shape on this machine; the message gives the reason."""


def plain(shape: Shape) -> Callable[[], None]:
    """A training step's forward and backward (weight gradients included), once per side."""
    model, batch = make_model(shape), make_batch(shape)

    def run() -> None:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            logits = model(batch.input_ids, batch.attention_mask)
            per_example_loss(logits, batch.targets).sum().backward()

    return run


def floor(shape: Shape) -> Callable[[], None]:
    """Forward and backward to the body's activations only: the cost no sketch avoids."""
    model, batch = make_model(shape), make_batch(shape)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.token_embedding.weight.requires_grad_(True)

    def run() -> None:
        for _ in range(2):
            logits = model(batch.input_ids, batch.attention_mask)
            loss = per_example_loss(logits, batch.targets).sum()
            torch.autograd.grad(loss, [model.token_embedding.weight])

    return run


def stage(shape: Shape, path: str = "auto") -> Callable[[], None]:
    """This project's sketch stage: train side summed over steps, test side per step."""
    model, batch = make_model(shape), make_batch(shape)
    layout = build_layout(model.body, "tensorsketch", shape.dim, seed=0, path=path)

    def run() -> None:
        sketch_batch(model, model.body, model.tau, batch, layout, per_step=False)
        sketch_batch(model, model.body, model.tau, batch, layout, per_step=True)

    return run


def reference(shape: Shape) -> Callable[[], None]:
    """The authors' package `step-decomposed-influence` (import name `sdi`), both sides."""
    try:
        from sdi import ProjectedTracInSDI
    except ImportError as error:
        raise Infeasible(
            f"step-decomposed-influence is not importable ({error}); "
            "install it with pip install -e '.[reference]'"
        ) from error
    model, batch = make_model(shape), make_batch(shape)
    estimator = ProjectedTracInSDI(
        model=model, target_modules=model.body, projection_size=shape.dim, loss_reduction="sum"
    )
    featurizer = estimator._featurizer  # one batch at a time, as its featurize_loader does

    def loss_fn(module: torch.nn.Module, pair: tuple) -> torch.Tensor:
        return per_example_loss(module(pair[0], pair[1]), pair[2])

    inputs = (batch.input_ids, batch.attention_mask, batch.targets)

    def run() -> None:
        # The reference keeps per-step features on both sides; its train side sums later.
        featurizer.compute_batch(batch=inputs, loss_fn=loss_fn)
        featurizer.compute_batch(batch=inputs, loss_fn=loss_fn)

    return run


def vmap_projection(shape: Shape, project: bool = True) -> Callable[[], None]:
    """Per-example gradients from torch.func (vmap of grad), then a dense Gaussian projection.

    The test side differentiates a model unrolled with one copy of the body per step, so
    it gets per-step gradients; the train side differentiates the shared body. Each body
    tensor is projected to `shape.dim` entries by its own dense matrix.
    """
    model, batch = make_model(shape), make_batch(shape)
    body = {name: p.detach() for name, p in model.body.named_parameters()}
    sizes = {name: p.numel() for name, p in body.items()}
    projections = None
    if project:
        needed = 4 * shape.dim * sum(sizes.values())
        if needed > DENSE_PROJECTION_BYTES:
            raise Infeasible(
                f"the dense projection needs {needed / 2**30:.1f} GiB "
                f"(above the {DENSE_PROJECTION_BYTES / 2**30:.0f} GiB cap on this machine)"
            )
        generator = torch.Generator().manual_seed(0)
        projections = {
            name: torch.randn(size, shape.dim, generator=generator) / math.sqrt(shape.dim)
            for name, size in sizes.items()
        }

    def unrolled_loss(step_params: dict, ids: torch.Tensor, targets: torch.Tensor):
        positions = torch.arange(ids.shape[0])
        x = model.token_embedding(ids[None]) + model.position_embedding(positions)
        state = torch.zeros_like(x)
        for step in range(shape.tau):
            params = {name: value[step] for name, value in step_params.items()}
            state = functional_call(model.body, params, (state + x, None))
        logits = model.head(model.ln_f(state))
        return per_example_loss(logits, targets[None]).sum()

    def shared_loss(params: dict, ids: torch.Tensor, targets: torch.Tensor):
        stacked = {name: value.expand(shape.tau, *value.shape) for name, value in params.items()}
        return unrolled_loss(stacked, ids, targets)

    per_step = vmap(grad(unrolled_loss), in_dims=(None, 0, 0))
    total = vmap(grad(shared_loss), in_dims=(None, 0, 0))
    stacked = {name: p.expand(shape.tau, *p.shape).contiguous() for name, p in body.items()}

    def run() -> None:
        train = total(body, batch.input_ids, batch.targets)
        test = per_step(stacked, batch.input_ids, batch.targets)
        if projections is not None:
            for name, matrix in projections.items():
                train[name].reshape(shape.batch, -1) @ matrix
                test[name].reshape(shape.batch * shape.tau, -1) @ matrix

    return run


METHODS = {
    "plain": plain,
    "floor": floor,
    "stage": stage,
    "stage_fft": lambda shape: stage(shape, "fft"),
    "stage_direct": lambda shape: stage(shape, "direct"),
    "reference": reference,
    "vmap_projection": vmap_projection,
    "vmap_only": lambda shape: vmap_projection(shape, project=False),
}
