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


@dataclass
class TensorSlot:
    """Where one parameter's sketch lives in the concatenated sketch vector."""

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

    def use_direct_path(self, slot: TensorSlot, tokens: int) -> bool:
        """Choose between forming d^T a per example (direct) and per-token FFTs."""
        if self.path != "auto":
            return self.path == "direct"
        out_features, in_features = slot.spec.shape
        # Direct costs about tokens*out*in multiply-adds per example; the FFT path about
        # tokens*(out + in + 3 m log2 m). NOTE: the factor 3 is an estimate, not tuned.
        fft_cost = tokens * (out_features + in_features + 3 * self.dim * self.dim.bit_length())
        return tokens * out_features * in_features <= fft_cost


class SketchAccumulator:
    """Consumes module uses and builds one sketch per example and step (or summed over steps).

    With `per_step=True` the result has shape (batch, tau, total_dim), step t at index t-1;
    with `per_step=False` it has shape (batch, 1, total_dim), the sum over steps, which is
    all the training side needs. Sums are kept in the frequency domain for TensorSketch
    slots on the FFT path, so only one inverse FFT runs per example and slot.
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
        elif self.layout.use_direct_path(slot, a.shape[1]):
            self._target(slot, row).add_(tensorsketch_direct(a, d, slot.axes[0], slot.axes[1]))
        else:
            key = f"{slot.spec.name}/{row}"
            spectrum = tensorsketch_spectrum(a, d, slot.axes[0], slot.axes[1])
            if key in self.spectra:
                self.spectra[key] += spectrum
            else:
                self.spectra[key] = spectrum

    def result(self) -> torch.Tensor:
        """Finish pending inverse FFTs and return the sketches."""
        for key, spectrum in self.spectra.items():
            name, row = key.rsplit("/", 1)
            slot = self.layout.by_name[name]
            sketch = torch.fft.irfft(spectrum, n=slot.width, dim=-1)
            self._target(slot, int(row)).add_(sketch.to(self.dtype))
        self.spectra.clear()
        return self.output


def tensorsketch_spectrum(
    a: torch.Tensor, d: torch.Tensor, out_axis: HashedAxis, in_axis: HashedAxis
) -> torch.Tensor:
    """Return the rFFT of the TensorSketch of sum_tokens d a^T, per example.

    The TensorSketch of an outer product d a^T is the circular convolution of the
    CountSketches of d and a, so its FFT is the product of theirs; the sum over tokens is
    taken in the frequency domain.
    """
    sketch_d = torch.fft.rfft(count_sketch(d, out_axis), dim=-1)
    sketch_a = torch.fft.rfft(count_sketch(a, in_axis), dim=-1)
    return (sketch_d * sketch_a).sum(dim=1)


def tensorsketch_direct(
    a: torch.Tensor, d: torch.Tensor, out_axis: HashedAxis, in_axis: HashedAxis
) -> torch.Tensor:
    """Return the TensorSketch of sum_tokens d a^T by forming that matrix per example.

    TensorSketch equals a CountSketch of the matrix entries with bucket
    (h_out(i) + h_in(j)) mod m and sign s_out(i) s_in(j). Cheaper than FFTs for narrow
    layers; gives the same sketch up to float rounding.
    """
    buckets = out_axis.buckets
    out_index, out_sign = out_axis.tensors(a.device, a.dtype)
    in_index, in_sign = in_axis.tensors(a.device, a.dtype)
    # Signs applied to the factors, so the (out, in) matrix is formed once per example.
    gradient = torch.einsum("bto,bti->boi", d * out_sign, a * in_sign)
    index = (out_index[:, None] + in_index[None, :]) % buckets
    flat_index = index.reshape(1, -1).expand(gradient.shape[0], -1)
    out = gradient.new_zeros(gradient.shape[0], buckets)
    return out.scatter_add_(1, flat_index, gradient.reshape(gradient.shape[0], -1))
