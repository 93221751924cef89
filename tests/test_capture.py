"""Per-step gradient capture against an unrolled-model oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from operators.batching import collate
from operators.capture import CaptureError, StepCapture
from operators.gradients import build_layout, sketch_batch
from operators.model import LoopedGPT, LoopedGPTConfig
from operators.tasks.base import IGNORE_INDEX
from tests.oracle import unrolled_step_gradients


def make_model(seed: int = 0, **overrides) -> LoopedGPT:
    torch.manual_seed(seed)
    config = LoopedGPTConfig(
        vocab_size=6, context_length=12, d_model=16, n_heads=2, n_layers=2, tau=3, **overrides
    )
    model = LoopedGPT(config).double()
    # Perturb every parameter so that no gradient vanishes by symmetry (zero biases,
    # unit LayerNorm weights).
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def random_examples(count: int, vocab: int, seed: int) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(seed)
    ids, targets = [], []
    for index in range(count):
        length = 4 + index % 5
        sequence = torch.randint(0, vocab - 1, (length,), generator=generator).tolist()
        target = torch.randint(0, vocab - 1, (length,), generator=generator).tolist()
        target[0] = IGNORE_INDEX
        ids.append(sequence)
        targets.append(target)
    return ids, targets


def exact_step_gradients(model: LoopedGPT, ids, targets, reduction="sum") -> torch.Tensor:
    layout = build_layout(model.body, "exact", 0, 0)
    batch = collate(ids, targets, pad_id=model.config.vocab_size - 1)
    result = sketch_batch(
        model,
        model.body,
        model.tau,
        batch,
        layout,
        per_step=True,
        loss_reduction=reduction,
        dtype=torch.float64,
    )
    return result.sketches, layout


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_exact_steps_match_unrolled_oracle(causal: bool, reduction: str) -> None:
    model = make_model(causal=causal)
    ids, targets = random_examples(4, model.config.vocab_size, seed=1)
    sketches, layout = exact_step_gradients(model, ids, targets, reduction)

    for row in range(len(ids)):
        oracle = unrolled_step_gradients(
            model, torch.tensor(ids[row]), torch.tensor(targets[row]), reduction
        )
        for step in range(model.tau):
            for slot in layout.slots:
                captured = sketches[row, step, slot.offset : slot.offset + slot.width]
                expected = oracle[step][slot.spec.name].reshape(-1)
                assert torch.allclose(captured, expected, rtol=1e-9, atol=1e-12), (
                    f"example {row} step {step + 1} {slot.spec.name}"
                )


def test_steps_sum_to_full_body_gradient() -> None:
    model = make_model()
    ids, targets = random_examples(1, model.config.vocab_size, seed=2)
    sketches, layout = exact_step_gradients(model, ids, targets)

    batch = collate(ids, targets, pad_id=5)
    from operators.model import per_example_loss

    loss = per_example_loss(model(batch.input_ids, batch.attention_mask), batch.targets).sum()
    grads = torch.autograd.grad(loss, list(model.body.parameters()))
    full = torch.cat([g.reshape(-1) for g in grads])
    assert torch.allclose(sketches[0].sum(dim=0), full, rtol=1e-9, atol=1e-12)


def test_exact_gradient_ignores_batch_padding() -> None:
    model = make_model()
    ids, targets = random_examples(5, model.config.vocab_size, seed=3)
    together, _ = exact_step_gradients(model, ids, targets)
    for row in range(len(ids)):
        alone, _ = exact_step_gradients(model, [ids[row]], [targets[row]])
        assert torch.allclose(together[row], alone[0], rtol=1e-9, atol=1e-12)


def test_bias_on_some_layers_only() -> None:
    model = make_model()
    # Drop the bias of the first attention projection and the last MLP projection.
    model.body.layers[0].attn.qkv.bias = None
    model.body.layers[1].mlp.proj.bias = None
    ids, targets = random_examples(2, model.config.vocab_size, seed=4)
    sketches, layout = exact_step_gradients(model, ids, targets)

    names = [slot.spec.name for slot in layout.slots]
    assert "layers.0.attn.qkv.bias" not in names
    assert "layers.0.attn.proj.bias" in names
    for row in range(len(ids)):
        oracle = unrolled_step_gradients(model, torch.tensor(ids[row]), torch.tensor(targets[row]))
        for step in range(model.tau):
            for slot in layout.slots:
                captured = sketches[row, step, slot.offset : slot.offset + slot.width]
                expected = oracle[step][slot.spec.name].reshape(-1)
                assert torch.allclose(captured, expected, rtol=1e-9, atol=1e-12)


def test_tau_mismatch_raises() -> None:
    model = make_model()
    ids, targets = random_examples(1, model.config.vocab_size, seed=5)
    layout = build_layout(model.body, "exact", 0, 0)
    batch = collate(ids, targets, pad_id=5)
    with pytest.raises(CaptureError, match="body ran 3 times .* tau=4"):
        sketch_batch(model, model.body, 4, batch, layout, per_step=True, dtype=torch.float64)


class SkippingBody(nn.Module):
    """A body whose second layer runs only on odd loop steps."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = torch.tanh(self.first(x))
        return self.second(x) if self.calls % 2 else x


def test_parameter_skipped_in_a_step_raises() -> None:
    body = SkippingBody()
    with StepCapture(body, 2, lambda use: None) as capture:
        state = torch.zeros(1, 3, 4)
        for _ in range(2):
            state = body(state + 1.0)
        with pytest.raises(CaptureError, match=r"second.weight.*used 1 times in 2 loop steps"):
            capture.check_forward()


def test_multihead_attention_out_proj_raises() -> None:
    body = nn.Sequential(nn.LayerNorm(8))
    body.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = body[0](x)
        return body.attn(x, x, x, need_weights=False)[0]

    with pytest.raises(CaptureError, match="not held by an nn.Linear"):
        StepCapture(body, 1, lambda use: None)
    # With the packed input projection frozen, out_proj is covered but never fires.
    body.attn.in_proj_weight.requires_grad_(False)
    body.attn.in_proj_bias.requires_grad_(False)
    body.forward = forward
    with StepCapture(body, 1, lambda use: None) as capture:
        body(torch.zeros(1, 2, 8))
        with pytest.raises(CaptureError, match=r"out_proj.weight.*used 0 times"):
            capture.check_forward()
