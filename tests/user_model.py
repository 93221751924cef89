"""A user-defined looped model, used by the tests to show that configuration alone plugs it in.

It differs from the built-in looped GPT on purpose: no attention, a gated recurrent cell
that mixes tokens through a causal prefix mean, the shared module at a nested attribute
path (`core.cell`), the state passed as the first argument, and a loss written with
log_softmax instead of cross_entropy. A configuration selects it with

    model:
      factory: tests.user_model:build_recurrent_tagger
      body: core.cell
      loss: tests.user_model:masked_cross_entropy
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def causal_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Return, at each position, the mean of x over the real positions up to it."""
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    weights = mask.to(x.dtype)[..., None]
    totals = torch.cumsum(x * weights, dim=1)
    counts = torch.cumsum(weights, dim=1).clamp(min=1.0)
    return totals / counts


class GatedCell(nn.Module):
    """One loop step: state <- state + gate * candidate, computed from state and input."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.update = nn.Linear(2 * width, hidden)
        self.out = nn.Linear(hidden, width, bias=False)
        self.gate = nn.Linear(2 * width, width)

    def forward(
        self, state: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.norm(state + inputs)
        features = torch.cat([h, self.mix(causal_mean(h, mask))], dim=-1)
        candidate = self.out(torch.tanh(self.update(features)))
        return state + torch.sigmoid(self.gate(features)) * candidate


class RecurrentTagger(nn.Module):
    """Embeddings, the cell applied `tau` times from a zero state, and a linear readout."""

    def __init__(
        self, vocab_size: int, context_length: int, width: int, hidden: int, tau: int
    ) -> None:
        super().__init__()
        self.tau = tau
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context_length, width)
        self.core = nn.ModuleDict({"cell": GatedCell(width, hidden)})
        self.readout = nn.Linear(width, vocab_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        inputs = self.embed(input_ids) + self.position(positions)
        mask = attention_mask.bool() if attention_mask is not None else None
        state = torch.zeros_like(inputs)
        for _ in range(self.tau):
            state = self.core.cell(state, inputs, mask)
        return self.readout(state)


def build_recurrent_tagger(config: dict) -> RecurrentTagger:
    """Model factory: takes the pipeline's model config dict (d_model, tau, options...)."""
    width = config["d_model"]
    return RecurrentTagger(
        vocab_size=config["vocab_size"],
        context_length=config["context_length"],
        width=width,
        hidden=config.get("hidden", 2 * width),
        tau=config["tau"],
    )


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Return one cross-entropy per example over positions whose target is not IGNORE_INDEX."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    losses = -(picked * mask).sum(dim=1)
    if reduction == "mean":
        losses = losses / mask.sum(dim=1).clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    return losses
