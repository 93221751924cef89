"""Deterministic hash tables for CountSketch and TensorSketch.

Each table is derived from (sketch seed, parameter name, role) with SHAKE-256, so it is
byte-identical on every worker, device, platform and day, and does not depend on the
order in which parameters are visited.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

HASH_VERSION = "sdi-hash-v1"


def hash_table(
    seed: int, name: str, role: str, length: int, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (bucket index, sign) arrays of `length` entries for one hashed axis.

    Bucket indices lie in [0, buckets) and signs are +1 or -1. Each entry takes 64 bits
    of the SHAKE-256 stream: the low 63 bits pick the bucket (the modulo bias is below
    buckets / 2**63) and the top bit picks the sign.
    """
    if length < 1 or buckets < 1:
        raise ValueError(f"hash table needs length >= 1 and buckets >= 1, got {length}, {buckets}")
    key = f"{HASH_VERSION}\x00{seed}\x00{name}\x00{role}".encode()
    raw = np.frombuffer(hashlib.shake_256(key).digest(8 * length), dtype="<u8")
    index = ((raw & np.uint64(2**63 - 1)) % np.uint64(buckets)).astype(np.int64)
    sign = np.where(raw >> np.uint64(63), -1.0, 1.0).astype(np.float32)
    return index, sign


class HashedAxis:
    """One axis of a sketched tensor: bucket indices and signs, cached per device and dtype."""

    def __init__(self, seed: int, name: str, role: str, length: int, buckets: int) -> None:
        self.index_np, self.sign_np = hash_table(seed, name, role, length, buckets)
        self.buckets = buckets
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tensors(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            index = torch.from_numpy(self.index_np).to(device)
            sign = torch.from_numpy(self.sign_np).to(device=device, dtype=dtype)
            self._cache[key] = (index, sign)
        return self._cache[key]

    def digest_bytes(self) -> bytes:
        return self.index_np.tobytes() + self.sign_np.tobytes()


def count_sketch(values: torch.Tensor, axis: HashedAxis) -> torch.Tensor:
    """CountSketch the last dimension of `values` into `axis.buckets` buckets."""
    index, sign = axis.tensors(values.device, values.dtype)
    out = values.new_zeros(*values.shape[:-1], axis.buckets)
    return out.index_add_(values.dim() - 1, index, values * sign)
