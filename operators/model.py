"""A looped (weight-tied, recurrent-depth) GPT.

The model has three parts:

- prelude: token and position embeddings, used once;
- body: one shared stack of pre-norm transformer layers, applied `tau` times with input
  injection, `state = body(state + x)` starting from a zero state;
- readout: final LayerNorm and output head, used once.

`LoopedGPT.body` is the module whose parameters are attributed step by step. Every
parameter of the body lives in an `nn.Linear` or `nn.LayerNorm`, so gradient capture
(`operators.capture`) records each use of each parameter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from operators.tasks.base import IGNORE_INDEX

LOSS_REDUCTIONS = ("sum", "mean")


@dataclass
class LoopedGPTConfig:
    """Shape of a looped GPT. `bias` applies to every Linear and LayerNorm of the model."""

    vocab_size: int = 4
    context_length: int = 16
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    tau: int = 4
    mlp_ratio: int = 4
    bias: bool = True
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers", "tau"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention whose projections are plain nn.Linear modules."""

    def __init__(self, config: LoopedGPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.causal = config.causal
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (batch, heads, length, head_dim)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))

        mask = None
        if key_mask is not None or self.causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device)
            if self.causal:
                mask = torch.tril(mask)
            mask = mask.expand(batch, 1, length, length)
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :]
                # A padded query row may see no key at all; let it see itself so that
                # softmax stays finite. Its output never reaches a real position.
                diagonal = torch.eye(length, dtype=torch.bool, device=x.device)
                mask = mask | diagonal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: LoopedGPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: LoopedGPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


class LoopedBody(nn.Module):
    """The shared stack of layers applied once per loop step."""

    def __init__(self, config: LoopedGPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class LoopedGPT(nn.Module):
    """Prelude, body applied `tau` times with input injection, readout."""

    def __init__(self, config: LoopedGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tau = config.tau
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.body = LoopedBody(config)
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=config.bias)
        self.apply(self._init_weights)
        # Scale residual projections as GPT-2 does, so that tau loop steps stay stable.
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):
                std = 0.02 / math.sqrt(2 * config.n_layers * config.tau)
                nn.init.normal_(parameter, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return logits of shape (batch, length, vocab_size).

        `attention_mask` (batch, length) is True for real tokens and False for padding.
        """
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"sequence length {length} exceeds model.context_length="
                f"{self.config.context_length}"
            )
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)

        key_mask = attention_mask.bool() if attention_mask is not None else None
        state = torch.zeros_like(x)
        for _ in range(self.tau):
            state = self.body(state + x, key_mask)

        return self.head(self.ln_f(state))


def build_looped_gpt(config: dict) -> LoopedGPT:
    """Build a LoopedGPT from a model configuration dict (the pipeline's `model.factory` default)."""
    known = {f.name for f in fields(LoopedGPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"model settings {unknown} are not LoopedGPT settings (known: {sorted(known)}); "
            "remove them, or set model.factory to a factory that takes them"
        )
    return LoopedGPT(LoopedGPTConfig(**config))


def per_example_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Return one cross-entropy loss per example, over its target positions only.

    Positions whose target is IGNORE_INDEX (prompt, givens, padding) contribute exactly
    zero. `reduction="sum"` adds the position losses; `"mean"` divides by the example's
    number of target positions (an example without targets gets loss 0).
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    token_loss = F.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    loss = token_loss.sum(dim=1)
    if reduction == "mean":
        count = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        loss = loss / count
    return loss
