"""Sketches of per-example, per-step body gradients.

A sketch layout assigns every body parameter a slot of the sketch vector and a method:

- `identity`: the exact gradient, flattened (exact mode, and tensors no larger than the
  sketch dimension, where hashing would only add error);
- `countsketch`: CountSketch of a 1-D gradient (biases, LayerNorm weights);
- `tensorsketch`: TensorSketch of a 2-D Linear weight gradient sum_tokens d a^T, computed
  from CountSketches of d and a without forming the matrix;
- `pooled`: CountSketch of every entry into one block shared by all pooled tensors
  (`operators.projection`).

Each estimator is unbiased per tensor, E<S(g), S(g')> = <g, g'>, and train and test sides
that share a layout (same seed, names, shapes, dimension) are directly comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from operators.capture import ModuleUse, ParameterSpec
from operators.hashing import HASH_VERSION, HashedAxis, count_sketch
from operators.projection import (
    POOLED_METHOD,
    entry_axis,
    pooled_uses_identity,
    pooled_weight_sketch,
)

SKETCH_METHODS = ("tensorsketch", "exact", POOLED_METHOD)
TENSOR_PATHS = ("auto", "fft", "direct")

# Cost model of the two TensorSketch paths, in nanoseconds per example on one CPU thread.
# Only the ratios matter, because the decision is which path is cheaper. Fitted to timings
# of both paths per layer shape (batch 32, 18 tokens, m=2048) on a 2-core AMD EPYC with
# AVX-512 and torch 2.13; `python -m benchmarks.run` compares the paths as whole stages.
# NOTE: fitted on one CPU; on GPUs and other CPUs the crossover may sit elsewhere, and
# sketch.path=fft or direct overrides it.
COST_MATMUL = 0.037  # per token and matrix entry, batched d^T a
COST_SCATTER = 0.47  # per matrix entry hashed into the buckets
COST_COUNT_SKETCH = 0.9  # per token and feature, CountSketch of d and a
COST_FFT = 0.19  # per token and m log2 m, two real FFTs of length m and their product
# Work buffers of the FFT path are sized to stay in a core's L2 cache; larger blocks of
# rows run the FFT several times slower on the machines measured.
FFT_BLOCK_BYTES = 1 << 20
# Upper bound on the per-example d^T a matrices formed at once by the direct path.
DIRECT_BLOCK_ELEMENTS = 1 << 21


@dataclass
class TensorSlot:
    """Location and method of one parameter's sketch in the concatenated sketch vector."""

    spec: ParameterSpec
    method: str  # identity, countsketch, tensorsketch or pooled
    offset: int
    width: int
    axes: tuple[HashedAxis, ...] = field(default=(), repr=False)


class SketchLayout:
    """The per-tensor methods, hash tables and offsets for one sketch configuration."""

    def __init__(
        self, specs: list[ParameterSpec], method: str, dim: int, seed: int, path: str = "auto"
    ) -> None:
        if method not in SKETCH_METHODS:
            raise ValueError(f"sketch.method must be one of {SKETCH_METHODS}, got {method!r}")
        if method != "exact" and dim < 1:
            raise ValueError(f"sketch.dim must be at least 1, got {dim}")
        if path not in TENSOR_PATHS:
            raise ValueError(f"sketch.path must be one of {TENSOR_PATHS}, got {path!r}")
        self.method = method
        self.dim = dim
        self.seed = seed
        self.path = path
        self.slots: list[TensorSlot] = []
        offset = 0
        for spec in specs:
            slot = self._make_slot(spec, offset)
            self.slots.append(slot)
            if slot.method != POOLED_METHOD:
                offset += slot.width
        if any(slot.method == POOLED_METHOD for slot in self.slots):
            # Pooled tensors share one block of `dim` buckets after the exact ones.
            for slot in self.slots:
                if slot.method == POOLED_METHOD:
                    slot.offset = offset
            offset += dim
        self.total_dim = offset
        self.by_name = {slot.spec.name: slot for slot in self.slots}

    def _make_slot(self, spec: ParameterSpec, offset: int) -> TensorSlot:
        if self.method == POOLED_METHOD:
            if pooled_uses_identity(spec.numel, self.dim):
                return TensorSlot(spec, "identity", offset, spec.numel)
            axis = entry_axis(self.seed, spec.name, spec.numel, self.dim)
            return TensorSlot(spec, POOLED_METHOD, offset, self.dim, (axis,))
        if self.method == "exact" or spec.numel <= self.dim:
            return TensorSlot(spec, "identity", offset, spec.numel)
        return self._hashed_slot(spec, offset)

    def _hashed_slot(self, spec: ParameterSpec, offset: int) -> TensorSlot:
        """Return a TensorSketch slot for a 2-D weight, a CountSketch slot otherwise."""
        if len(spec.shape) == 2:
            out_features, in_features = spec.shape
            axes = (
                HashedAxis(self.seed, spec.name, "out", out_features, self.dim),
                HashedAxis(self.seed, spec.name, "in", in_features, self.dim),
            )
            return TensorSlot(spec, "tensorsketch", offset, self.dim, axes)
        axis = HashedAxis(self.seed, spec.name, "vector", spec.numel, self.dim)
        return TensorSlot(spec, "countsketch", offset, self.dim, (axis,))

    def describe(self) -> dict:
        """Return a JSON-ready description: methods, shapes, offsets and the hash digest."""
        return {
            "method": self.method,
            "dim": self.dim,
            "seed": self.seed,
            "total_dim": self.total_dim,
            "hash_version": HASH_VERSION,
            "hash_digest": self.hash_digest(),
            "tensors": [
                {
                    "name": slot.spec.name,
                    "shape": list(slot.spec.shape),
                    "method": slot.method,
                    "offset": slot.offset,
                    "width": slot.width,
                }
                for slot in self.slots
            ],
        }

    def hash_digest(self) -> str:
        """Return a SHA-256 digest of every tensor's name, method, shape and hash tables."""
        digest = hashlib.sha256()
        for slot in self.slots:
            header = json.dumps([slot.spec.name, slot.method, list(slot.spec.shape), slot.width])
            digest.update(header.encode())
            for axis in slot.axes:
                digest.update(axis.digest_bytes())
        return digest.hexdigest()

    def use_direct_path(self, slot: TensorSlot, tokens: int, hashed_steps: int = 1) -> bool:
        """Choose between forming d^T a per example (direct) and per-token FFTs.

        `hashed_steps` is the number of loop steps whose d^T a are summed before one
        hashing: 1 on the test side, tau on the training side, where the hashing cost is
        paid once per example instead of once per step and the crossover moves to wider
        layers.
        """
        if self.path != "auto":
            return self.path == "direct"
        out_features, in_features = slot.spec.shape
        entries = out_features * in_features
        hashing = entries / max(1, hashed_steps)
        direct_cost = COST_MATMUL * tokens * entries + COST_SCATTER * hashing
        fft_cost = tokens * (
            COST_COUNT_SKETCH * (out_features + in_features)
            + COST_FFT * self.dim * self.dim.bit_length()
        )
        return direct_cost <= fft_cost


class SketchAccumulator:
    """Consumes module uses and builds one sketch per example and step (or summed over steps).

    With `per_step=True` the result has shape (batch, tau, total_dim), step t at index t-1;
    with `per_step=False` it has shape (batch, 1, total_dim), the sum over steps, which is
    all the training side needs. Sums are kept in the frequency domain for TensorSketch
    slots on the FFT path, so only one inverse FFT runs per example and slot. On the
    training side the direct path keeps each use's factors and forms sum_steps d^T a in
    one batched product at the end, so each example's matrix is hashed once.
    """

    def __init__(
        self,
        layout: SketchLayout,
        module_specs: dict[str, list[int]],
        batch_size: int,
        tau: int,
        per_step: bool,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layout = layout
        self.module_slots = {
            module: [layout.slots[i] for i in indices] for module, indices in module_specs.items()
        }
        self.tau = tau
        self.per_step = per_step
        self.dtype = dtype
        rows = tau if per_step else 1
        self.output = torch.zeros(batch_size, rows, layout.total_dim, device=device, dtype=dtype)
        # Frequency-domain accumulators for TensorSketch slots on the FFT path.
        self.spectra: dict[str, torch.Tensor] = {}
        # Training-side factors of direct-path slots, hashed together in result().
        self.factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.workspace = _workspace(layout)

    def __call__(self, use: ModuleUse) -> None:
        row = use.step - 1 if self.per_step else 0
        a = use.inputs.to(self.dtype)
        d = use.grad_output.to(self.dtype)
        for slot in self.module_slots[use.module_name]:
            role = slot.spec.role
            if role == "linear.weight":
                self._add_weight(slot, row, a, d)
            elif role == "layernorm.weight":
                self._add_vector(slot, row, (d * a).sum(dim=1))
            else:  # linear.bias and layernorm.bias
                self._add_vector(slot, row, d.sum(dim=1))

    def _target(self, slot: TensorSlot, row: int) -> torch.Tensor:
        return self.output[:, row, slot.offset : slot.offset + slot.width]

    def _add_vector(self, slot: TensorSlot, row: int, gradient: torch.Tensor) -> None:
        if slot.method == "identity":
            self._target(slot, row).add_(gradient)
        else:
            self._target(slot, row).add_(count_sketch(gradient, slot.axes[0]))

    def _add_weight(self, slot: TensorSlot, row: int, a: torch.Tensor, d: torch.Tensor) -> None:
        if slot.method == "identity":
            gradient = torch.einsum("bto,bti->boi", d, a)
            self._target(slot, row).add_(gradient.reshape(gradient.shape[0], -1))
        elif slot.method == POOLED_METHOD:
            self._target(slot, row).add_(pooled_weight_sketch(a, d, slot.axes[0]))
        elif self.layout.use_direct_path(slot, a.shape[1], 1 if self.per_step else self.tau):
            if self.per_step:
                sketch = tensorsketch_direct(a, d, slot.axes[0], slot.axes[1])
                self._target(slot, row).add_(sketch)
            else:
                self.factors.setdefault(slot.spec.name, []).append((a, d))
        else:
            key = f"{slot.spec.name}/{row}"
            if key not in self.spectra:
                buckets = slot.axes[0].buckets
                self.spectra[key] = torch.zeros(
                    a.shape[0], buckets // 2 + 1, device=a.device, dtype=_complex(self.dtype)
                )
            _accumulate_spectrum(
                self.spectra[key], a, d, slot.axes[0], slot.axes[1], self.workspace
            )

    def result(self) -> torch.Tensor:
        """Finish pending inverse FFTs and direct-path products and return the sketches."""
        for key, spectrum in self.spectra.items():
            name, row = key.rsplit("/", 1)
            slot = self.layout.by_name[name]
            sketch = torch.fft.irfft(spectrum, n=slot.width, dim=-1)
            self._target(slot, int(row)).add_(sketch.to(self.dtype))
        self.spectra.clear()
        for name, uses in self.factors.items():
            slot = self.layout.by_name[name]
            # Concatenating the steps along tokens makes sum_steps d^T a one product.
            a = torch.cat([a for a, _ in uses], dim=1)
            d = torch.cat([d for _, d in uses], dim=1)
            self._target(slot, 0).add_(tensorsketch_direct(a, d, slot.axes[0], slot.axes[1]))
        self.factors.clear()
        return self.output


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _workspace(layout: SketchLayout) -> dict:
    """Return the layout's reusable work buffers (fresh large buffers page-fault every call)."""
    workspace = getattr(layout, "_workspace", None)
    if workspace is None:
        workspace = {}
        layout._workspace = workspace
    return workspace


def _buffer(workspace: dict, name: str, shape: tuple, like: torch.Tensor, dtype=None):
    """Return a reusable buffer of at least `shape`, viewed to exactly that shape."""
    dtype = dtype or like.dtype
    key = (name, like.device, dtype)
    numel = 1
    for size in shape:
        numel *= size
    buffer = workspace.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, device=like.device, dtype=dtype)
        workspace[key] = buffer
    return buffer[:numel].view(shape)


def _accumulate_spectrum(
    spectrum: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    out_axis: HashedAxis,
    in_axis: HashedAxis,
    workspace: dict,
) -> None:
    """Add the rFFT of the TensorSketch of sum_tokens d a^T to `spectrum`, per example.

    Examples go through in blocks small enough for the CountSketches and their spectra to
    stay in cache, with buffers reused across blocks and calls.
    """
    batch, tokens, _ = a.shape
    buckets = out_axis.buckets
    frequencies = buckets // 2 + 1
    row_bytes = tokens * buckets * a.element_size() * 2
    block = max(1, min(batch, FFT_BLOCK_BYTES // row_bytes))
    out_index, out_sign = out_axis.tensors(a.device, a.dtype)
    in_index, in_sign = in_axis.tensors(a.device, a.dtype)
    complex_dtype = _complex(a.dtype)
    for start in range(0, batch, block):
        stop = min(batch, start + block)
        rows = stop - start
        hashed_d = _buffer(workspace, "d", (rows, tokens, buckets), a)
        hashed_a = _buffer(workspace, "a", (rows, tokens, buckets), a)
        hashed_d.zero_().index_add_(2, out_index, d[start:stop] * out_sign)
        hashed_a.zero_().index_add_(2, in_index, a[start:stop] * in_sign)
        shape = (rows, tokens, frequencies)
        spectrum_d = torch.fft.rfft(
            hashed_d, dim=-1, out=_buffer(workspace, "fd", shape, a, complex_dtype)
        )
        spectrum_a = torch.fft.rfft(
            hashed_a, dim=-1, out=_buffer(workspace, "fa", shape, a, complex_dtype)
        )
        spectrum[start:stop] += spectrum_d.mul_(spectrum_a).sum(dim=1)


def tensorsketch_spectrum(
    a: torch.Tensor, d: torch.Tensor, out_axis: HashedAxis, in_axis: HashedAxis
) -> torch.Tensor:
    """Return the rFFT of the TensorSketch of sum_tokens d a^T, per example.

    The TensorSketch of an outer product d a^T is the circular convolution of the
    CountSketches of d and a, so its FFT is the product of theirs; the sum over tokens is
    taken in the frequency domain.
    """
    spectrum = torch.zeros(
        a.shape[0], out_axis.buckets // 2 + 1, device=a.device, dtype=_complex(a.dtype)
    )
    _accumulate_spectrum(spectrum, a, d, out_axis, in_axis, {})
    return spectrum


def _pair_index(out_axis: HashedAxis, in_axis: HashedAxis, device: torch.device) -> torch.Tensor:
    """Return the flattened bucket (h_out(i) + h_in(j)) mod m of every matrix entry.

    Cached on the output axis, so the cache lives as long as the layout that owns it.
    """
    cache = out_axis.__dict__.setdefault("_pair_index", {})
    key = (id(in_axis), str(device))
    if key not in cache:
        out_index, _ = out_axis.tensors(device, torch.float32)
        in_index, _ = in_axis.tensors(device, torch.float32)
        index = ((out_index[:, None] + in_index[None, :]) % out_axis.buckets).reshape(-1)
        cache[key] = (in_axis, index)  # holding in_axis keeps its id from being reused
    return cache[key][1]


def tensorsketch_direct(
    a: torch.Tensor, d: torch.Tensor, out_axis: HashedAxis, in_axis: HashedAxis
) -> torch.Tensor:
    """Return the TensorSketch of sum_tokens d a^T by forming that matrix per example.

    TensorSketch equals a CountSketch of the matrix entries with bucket
    (h_out(i) + h_in(j)) mod m and sign s_out(i) s_in(j). Cheaper than FFTs for narrow
    layers; gives the same sketch up to float rounding. Examples go through in blocks of at
    most DIRECT_BLOCK_ELEMENTS matrix entries, so memory stays bounded for any width.
    """
    buckets = out_axis.buckets
    batch = a.shape[0]
    _, out_sign = out_axis.tensors(a.device, a.dtype)
    _, in_sign = in_axis.tensors(a.device, a.dtype)
    index = _pair_index(out_axis, in_axis, a.device)
    entries = index.numel()
    block = max(1, min(batch, DIRECT_BLOCK_ELEMENTS // entries))
    # Signs applied to the factors, so the (out, in) matrix is formed once per example.
    signed_d = (d * out_sign).transpose(1, 2)
    signed_a = a * in_sign
    out = a.new_zeros(batch, buckets)
    for start in range(0, batch, block):
        stop = min(batch, start + block)
        gradient = torch.bmm(signed_d[start:stop], signed_a[start:stop])
        out[start:stop].index_add_(1, index, gradient.reshape(stop - start, entries))
    return out
