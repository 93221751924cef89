"""A run's folder layout, its stored configuration and the per-unit completion markers."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import semantic_config
from pipeline.store import Store

logger = logging.getLogger(__name__)


class RunConfigMismatchError(RuntimeError):
    """The run folder contains results of a different configuration."""


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class Run:
    """Paths of one run under `<store>/<run_name>/`.

    Layout:
        config.yaml                          the configuration that produced the results
        data/<split>/part-NNNNN.parquet      prepared examples
        checkpoints/step=NNNNNNN/            model.safetensors and meta.json
        sketches/checkpoint=<k>/split=<split>/part-NNNNN.parquet
        scores/, tracin/, topk/              reduce outputs
        _manifests/                          completion markers, written after each unit
    """

    def __init__(self, store: Store, run_name: str) -> None:
        self.store = store
        self.name = run_name

    def rel(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def url(self, *parts: str) -> str:
        return self.store.display(self.rel(*parts))

    def data_shard(self, split: str, part: int) -> str:
        return self.rel("data", split, f"part-{part:05d}.parquet")

    def checkpoint_dir(self, step: int) -> str:
        return self.rel("checkpoints", f"step={step:07d}")

    def sketch_file(self, checkpoint: int, split: str, part: int) -> str:
        return self.rel(
            "sketches", f"checkpoint={checkpoint}", f"split={split}", f"part-{part:05d}.parquet"
        )

    def marker(self, stage: str, unit: str) -> str:
        return self.rel("_manifests", stage, f"{unit}.json")

    def manifest(self, stage: str) -> str:
        return self.rel("_manifests", f"{stage}.json")

    def is_done(self, stage: str, unit: str, expected: dict[str, Any] | None = None) -> bool:
        """Return True when a unit's marker exists (and, if given, matches `expected`)."""
        marker = self.marker(stage, unit)
        if not self.store.exists(marker):
            return False
        if expected is None:
            return True
        recorded = self.store.read_json(marker)
        return all(recorded.get(key) == value for key, value in expected.items())

    def mark_done(self, stage: str, unit: str, record: dict[str, Any]) -> None:
        self.store.write_json(self.marker(stage, unit), record)

    def claim(self, config: DictConfig) -> None:
        """Record the run's configuration, or check it against the one already recorded.

        Raises RunConfigMismatchError naming the first differing key unless
        `config.overwrite` is set, in which case the old run is deleted first.
        """
        current = semantic_config(config)
        path = self.rel("config.yaml")
        recorded = None
        if self.store.exists(path):
            recorded = OmegaConf.to_container(
                OmegaConf.create(self.store.read_bytes(path).decode())
            )
            recorded.pop("overwrite", None)
            if recorded != current:
                difference = first_difference(recorded, current)
                if not config.overwrite:
                    raise RunConfigMismatchError(
                        f"run {self.url()} was made with a different configuration "
                        f"({difference}); pick another run_name, or pass overwrite=true to "
                        "delete the old results"
                    )
                logger.warning("run %s: overwriting (%s)", self.name, difference)
                self.store.delete(self.name, recursive=True)
                recorded = None
        if recorded is None:
            self.store.write_bytes(path, OmegaConf.to_yaml(OmegaConf.create(current)).encode())


def first_difference(old: Any, new: Any, prefix: str = "") -> str:
    """Describe the first key whose value differs between two nested dictionaries."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new or old[key] != new[key]:
                return first_difference(old.get(key), new.get(key), name)
    return f"{prefix or 'value'}: recorded {old!r}, requested {new!r}"
