"""Independent references for the tests: an unrolled looped model differentiated with autograd."""

from __future__ import annotations

import torch
from torch.func import functional_call

from operators.model import LoopedGPT, per_example_loss


def unrolled_step_gradients(
    model: LoopedGPT,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "sum",
) -> list[dict[str, torch.Tensor]]:
    """Return, for one example, the gradient of each step's separate copy of the body.

    The looped forward pass is rebuilt by hand with one independent copy of every body
    parameter per loop step, so plain autograd gives phi_t directly: no hooks involved.
    """
    body_params = dict(model.body.named_parameters())
    copies = [
        {name: p.detach().clone().requires_grad_(True) for name, p in body_params.items()}
        for _ in range(model.tau)
    ]
    ids = input_ids[None]
    positions = torch.arange(ids.shape[1])
    x = model.token_embedding(ids) + model.position_embedding(positions)
    state = torch.zeros_like(x)
    for step_params in copies:
        state = functional_call(model.body, step_params, (state + x, None))
    logits = model.head(model.ln_f(state))
    loss = per_example_loss(logits, targets[None], reduction).sum()
    leaves = [p for step_params in copies for p in step_params.values()]
    grads = torch.autograd.grad(loss, leaves)
    names = list(body_params)
    out = []
    for step in range(model.tau):
        chunk = grads[step * len(names) : (step + 1) * len(names)]
        out.append(dict(zip(names, chunk, strict=True)))
    return out
