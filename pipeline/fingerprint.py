"""Sketch fingerprints: everything that must match for two sketches' inner product to mean anything."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from operators import __version__ as code_version
from operators.sketch import SketchLayout

FINGERPRINT_KEY = b"sdi.fingerprint"
# Fields that must be equal between train and test sketches of one checkpoint.
MATCH_FIELDS = (
    "sketch_method",
    "sketch_seed",
    "sketch_dim",
    "total_dim",
    "hash_digest",
    "parameters",
    "loss_reduction",
    "dtype",
    "checkpoint_hash",
    "model_fingerprint",
    "code_version",
    "tau",
)


class FingerprintMismatchError(RuntimeError):
    """Two sketch files cannot be combined."""


def model_fingerprint(model_config: dict[str, Any], layout: SketchLayout) -> str:
    """Return a digest of the model's shape and its body parameter names and shapes."""
    body = [[slot.spec.name, list(slot.spec.shape)] for slot in layout.slots]
    payload = json.dumps({"config": model_config, "body": body}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def sketch_fingerprint(
    layout: SketchLayout,
    model_config: dict[str, Any],
    checkpoint_hash: str,
    loss_reduction: str,
    dtype: str,
    tau: int,
) -> dict[str, Any]:
    """Return the fingerprint stored with every sketch file."""
    return {
        "sketch_method": layout.method,
        "sketch_seed": layout.seed,
        "sketch_dim": layout.dim,
        "total_dim": layout.total_dim,
        "hash_digest": layout.hash_digest(),
        "parameters": [slot.spec.name for slot in layout.slots],
        "tensor_methods": [slot.method for slot in layout.slots],
        "loss_reduction": loss_reduction,
        "dtype": dtype,
        "checkpoint_hash": checkpoint_hash,
        "model_fingerprint": model_fingerprint(model_config, layout),
        "code_version": code_version,
        "tau": tau,
    }


def encode(fingerprint: dict[str, Any]) -> dict[bytes, bytes]:
    return {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()}


def decode(metadata: dict[bytes, bytes], source: str) -> dict[str, Any]:
    if FINGERPRINT_KEY not in metadata:
        raise FingerprintMismatchError(
            f"{source} has no sdi.fingerprint metadata; it was not written by the sketch stage"
        )
    return json.loads(metadata[FINGERPRINT_KEY])


def check_compatible(
    reference: dict[str, Any], other: dict[str, Any], reference_source: str, other_source: str
) -> None:
    """Raise FingerprintMismatchError naming the first field that differs."""
    for field in MATCH_FIELDS:
        if reference.get(field) != other.get(field):
            raise FingerprintMismatchError(
                f"sketch fingerprints differ in {field!r}: {reference_source} has "
                f"{_short(reference.get(field))}, {other_source} has {_short(other.get(field))}; "
                "re-run the sketch stage for both with the same configuration"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
