"""Sketch estimators against exact inner products."""

from __future__ import annotations

import math

import pytest
import torch

from operators.batching import collate
from operators.capture import ParameterSpec
from operators.gradients import build_layout, sketch_batch
from operators.hashing import HashedAxis, count_sketch, hash_table
from operators.sketch import SketchLayout, tensorsketch_direct, tensorsketch_spectrum
from tests.test_capture import make_model, random_examples


def factors(seed: int, out_features: int, in_features: int, tokens: int = 5):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(2, tokens, in_features, generator=generator, dtype=torch.float64)
    d = torch.randn(2, tokens, out_features, generator=generator, dtype=torch.float64)
    return a, d


def test_hash_table_is_deterministic_and_named() -> None:
    first = hash_table(7, "layers.0.mlp.fc.weight", "in", 100, 64)
    again = hash_table(7, "layers.0.mlp.fc.weight", "in", 100, 64)
    other = hash_table(7, "layers.0.mlp.proj.weight", "in", 100, 64)
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1].tobytes() == again[1].tobytes()
    assert first[0].tobytes() != other[0].tobytes()
    assert set(first[1].tolist()) == {-1.0, 1.0}


def test_hash_table_known_values() -> None:
    # Pinned values: any change to the derivation breaks old sketches, so it must be seen.
    index, sign = hash_table(0, "w", "out", 4, 1000)
    assert index.tolist() == [479, 476, 673, 53]
    assert sign.tolist() == [1.0, 1.0, 1.0, -1.0]


def test_direct_and_fft_paths_agree() -> None:
    out_axis = HashedAxis(3, "w", "out", 24, 32)
    in_axis = HashedAxis(3, "w", "in", 40, 32)
    a, d = factors(0, 24, 40)
    direct = tensorsketch_direct(a, d, out_axis, in_axis)
    via_fft = torch.fft.irfft(tensorsketch_spectrum(a, d, out_axis, in_axis), n=32)
    assert torch.allclose(direct, via_fft, atol=1e-10)


def test_tensorsketch_matches_hashing_the_matrix() -> None:
    out_axis = HashedAxis(1, "w", "out", 6, 8)
    in_axis = HashedAxis(1, "w", "in", 5, 8)
    a, d = factors(1, 6, 5)
    gradient = torch.einsum("bto,bti->boi", d, a)
    brute = torch.zeros(2, 8, dtype=torch.float64)
    for i in range(6):
        for j in range(5):
            bucket = (out_axis.index_np[i] + in_axis.index_np[j]) % 8
            sign = out_axis.sign_np[i] * in_axis.sign_np[j]
            brute[:, bucket] += sign * gradient[:, i, j]
    assert torch.allclose(tensorsketch_direct(a, d, out_axis, in_axis), brute, atol=1e-12)


def sketched_ratio_and_error(kind: str, dim: int, seeds: int) -> tuple[float, float]:
    """Mean ratio of sketched to exact inner product, and RMS relative error, over seeds."""
    generator = torch.Generator().manual_seed(11)
    if kind == "vector":
        g1 = torch.randn(1, 512, generator=generator, dtype=torch.float64)
        g2 = g1 + 0.5 * torch.randn(1, 512, generator=generator, dtype=torch.float64)
        exact = float((g1 * g2).sum())
    else:
        a1, d1 = factors(21, 32, 32)
        a2 = a1 + 0.5 * torch.randn_like(a1)
        d2 = d1 + 0.5 * torch.randn_like(d1)
        exact = float(
            (torch.einsum("bto,bti->boi", d1, a1) * torch.einsum("bto,bti->boi", d2, a2))[0].sum()
        )
    ratios = []
    for seed in range(seeds):
        if kind == "vector":
            axis = HashedAxis(seed, "v", "vector", 512, dim)
            s1, s2 = count_sketch(g1, axis), count_sketch(g2, axis)
        else:
            out_axis = HashedAxis(seed, "w", "out", 32, dim)
            in_axis = HashedAxis(seed, "w", "in", 32, dim)
            s1 = tensorsketch_direct(a1, d1, out_axis, in_axis)
            s2 = tensorsketch_direct(a2, d2, out_axis, in_axis)
        ratios.append(float((s1[0] * s2[0]).sum()) / exact)
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    return float(ratios_t.mean()), float(((ratios_t - 1) ** 2).mean().sqrt())


@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_estimator_unbiased(kind: str) -> None:
    mean_ratio, _ = sketched_ratio_and_error(kind, dim=64, seeds=400)
    assert abs(mean_ratio - 1) < 0.05


@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_error_falls_like_inverse_sqrt_dim(kind: str) -> None:
    _, error_small = sketched_ratio_and_error(kind, dim=32, seeds=200)
    _, error_large = sketched_ratio_and_error(kind, dim=512, seeds=200)
    # 16x the buckets should cut the error by sqrt(16) = 4; allow a wide band for noise.
    ratio = error_small / error_large
    assert 2.5 < ratio < 6.5, ratio
    assert math.isfinite(error_large)


def test_layout_methods_and_exact_mode() -> None:
    specs = [
        ParameterSpec("w", "linear.weight", (64, 32)),
        ParameterSpec("b", "linear.bias", (64,)),
        ParameterSpec("small", "linear.weight", (4, 4)),
    ]
    layout = SketchLayout(specs, "tensorsketch", 32, 0)
    assert [slot.method for slot in layout.slots] == ["tensorsketch", "countsketch", "identity"]
    assert layout.total_dim == 32 + 32 + 16
    exact = SketchLayout(specs, "exact", 0, 0)
    assert exact.total_dim == 64 * 32 + 64 + 16
    with pytest.raises(ValueError, match="sketch.method"):
        SketchLayout(specs, "gaussian", 32, 0)


def test_sketch_ignores_batch_composition() -> None:
    model = make_model()
    layout = build_layout(model.body, "tensorsketch", 64, seed=5)
    ids, targets = random_examples(5, model.config.vocab_size, seed=8)
    together = sketch_batch(
        model, model.body, model.tau, collate(ids, targets, 5), layout, True, dtype=torch.float64
    ).sketches
    for row in range(len(ids)):
        alone = sketch_batch(
            model,
            model.body,
            model.tau,
            collate([ids[row]], [targets[row]], 5, length=12),
            layout,
            True,
            dtype=torch.float64,
        ).sketches
        assert torch.allclose(together[row], alone[0], atol=1e-10)


def test_sketch_conservation_in_sketch_space() -> None:
    model = make_model()
    layout = build_layout(model.body, "tensorsketch", 64, seed=5)
    ids, targets = random_examples(3, model.config.vocab_size, seed=9)
    batch = collate(ids, targets, 5)
    per_step = sketch_batch(model, model.body, model.tau, batch, layout, True, dtype=torch.float64)
    summed = sketch_batch(model, model.body, model.tau, batch, layout, False, dtype=torch.float64)
    assert torch.allclose(per_step.sketches.sum(dim=1), summed.sketches[:, 0], atol=1e-10)
