"""Independent references for the tests: an unrolled looped model differentiated with autograd."""

from __future__ import annotations

import copy

import torch
from torch import nn
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


class _StepCopies(nn.Module):
    """Stands in for a body: the i-th call runs the i-th independent copy of it."""

    def __init__(self, body: nn.Module, tau: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(body) for _ in range(tau))
        self.calls = 0

    def forward(self, *args, **kwargs):
        module = self.copies[self.calls]
        self.calls += 1
        return module(*args, **kwargs)


def unrolled_body_gradients(
    model: nn.Module,
    body_path: str,
    tau: int,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    loss_fn,
    reduction: str = "sum",
) -> list[dict[str, torch.Tensor]]:
    """Return phi_t for one example of any looped model, by swapping in one body copy per step.

    Works on a deep copy of `model` whose body (at the dotted `body_path`) is replaced by
    `tau` independent copies called in turn, so plain autograd gives each step's gradient.
    """
    unrolled = copy.deepcopy(model)
    *parents, name = body_path.split(".")
    owner = unrolled
    for part in parents:
        owner = getattr(owner, part)
    steps = _StepCopies(getattr(owner, name), tau)
    if isinstance(owner, nn.ModuleDict):
        owner[name] = steps
    else:
        setattr(owner, name, steps)

    logits = unrolled(input_ids[None])
    if steps.calls != tau:
        raise RuntimeError(f"the body ran {steps.calls} times, expected tau={tau}")
    loss = loss_fn(logits, targets[None], reduction).sum()
    out = []
    for copy_ in steps.copies:
        named = [(n, p) for n, p in copy_.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True)
        out.append({n: g for (n, _), g in zip(named, grads, strict=True)})
    return out
