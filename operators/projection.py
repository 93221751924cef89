"""The pooled CountSketch estimator (`sketch.method=pooled`).

Plain TensorSketch gives every parameter tensor its own `dim` buckets and hashes entry
(i, j) of a weight gradient to bucket (h_out(i) + h_in(j)) mod m with sign
s_out(i) s_in(j). Two properties cost accuracy per stored byte:

- Correlated collisions. When columns j and l collide (h_in(j) = h_in(l)), they collide
  in every row at once with the same relative sign, so the errors of all rows add
  coherently: the variance gains terms ||G^T G'||_F^2 + ||G G'^T||_F^2 on top of the
  ||G||_F^2 ||G'||_F^2 of a CountSketch with independent entry hashes. For the gradient
  pairs that dominate the scores (G and G' aligned) that is up to twice the variance.
- A fixed budget per tensor. The error of a tensor's block scales with the product of its
  gradient norms, and those differ by orders of magnitude between tensors; equal blocks
  spend most bytes on tensors that carry little of the score.

The pooled estimator hashes every entry of every sketched tensor independently
(SHAKE-256 of (seed, parameter name), as in `operators.hashing`) into one shared block of
`dim` buckets, and stores tensors of at most `dim // POOL_EXACT_FRACTION` entries exactly.
Cross-tensor terms have independent signs, so the estimate stays unbiased per tensor,
E<S(g_p), S(g'_p)> = <g_p, g'_p>, with unit scale whatever the tensor's shape. The shared
block spends its buckets where the gradient norm is, which is the allocation that
minimises the variance sum_p ||g_p||^2 ||g'_p||^2 / m_p for a given total.

The price: per-tensor scores cannot be read back from a pooled sketch, and a weight
gradient is formed per example (in chunks of bounded memory) instead of the factored FFT
path. docs/fidelity.md has the measurements.
"""

from __future__ import annotations

import torch

from operators.hashing import HashedAxis

POOLED_METHOD = "pooled"
# Tensors with at most dim // POOL_EXACT_FRACTION entries are stored exactly: they cost
# few bytes and remove their share of the variance. NOTE: a fixed heuristic, not tuned
# per model.
POOL_EXACT_FRACTION = 8
# Upper bound on floats of per-example weight gradients formed at once (256 MiB float32).
MAX_CHUNK_FLOATS = 1 << 26
# Entry hash tables are numel int64 + float32; refuse tensors whose table would not fit.
MAX_HASHED_ENTRIES = 1 << 26


def pooled_uses_identity(numel: int, dim: int) -> bool:
    """Return True when a tensor of `numel` entries is stored exactly in a pooled layout."""
    return numel * POOL_EXACT_FRACTION <= dim


def entry_axis(seed: int, name: str, numel: int, dim: int) -> HashedAxis:
    """Return the independent bucket and sign of every entry of one tensor (row-major)."""
    if numel > MAX_HASHED_ENTRIES:
        raise ValueError(
            f"parameter {name} has {numel} entries; the pooled sketch keeps one hash per "
            f"entry and supports at most {MAX_HASHED_ENTRIES}; use sketch.method=tensorsketch"
        )
    return HashedAxis(seed, name, "entry", numel, dim)


def pooled_weight_sketch(a: torch.Tensor, d: torch.Tensor, axis: HashedAxis) -> torch.Tensor:
    """CountSketch the entries of each example's sum_tokens d a^T into `axis.buckets` buckets.

    `a` is (batch, tokens, in_features) and `d` (batch, tokens, out_features). The
    gradient matrix is formed for a chunk of examples at a time, so memory stays below
    MAX_CHUNK_FLOATS floats whatever the batch size.
    """
    batch, _, in_features = a.shape
    out_features = d.shape[2]
    index, sign = axis.tensors(a.device, a.dtype)
    out = a.new_zeros(batch, axis.buckets)
    chunk = max(1, MAX_CHUNK_FLOATS // max(1, out_features * in_features))
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        gradient = torch.einsum("bto,bti->boi", d[start:stop], a[start:stop])
        flat = gradient.reshape(stop - start, -1) * sign
        out[start:stop].index_add_(1, index, flat)
    return out


def pooled_entry_sketch(gradient: torch.Tensor, axis: HashedAxis) -> torch.Tensor:
    """CountSketch a batch of flattened gradients (batch, numel) with per-entry hashes."""
    index, sign = axis.tensors(gradient.device, gradient.dtype)
    out = gradient.new_zeros(gradient.shape[0], axis.buckets)
    return out.index_add_(1, index, gradient * sign)
