"""Pluggable models: a factory, the body module to attribute and the per-example loss.

A configuration names three import paths of the form `package.module:attribute`:

- `model.factory`: a callable that takes the model configuration as a plain dict and
  returns an `nn.Module` whose forward is `model(input_ids, attention_mask)` returning
  logits of shape (batch, length, vocab_size);
- `model.body`: the dotted attribute path of the shared body inside that module (the
  module applied `model.tau` times; its trainable parameters must live in nn.Linear or
  nn.LayerNorm modules);
- `model.loss`: a callable `loss(logits, targets, reduction)` returning one loss per
  example, over target positions only.

The built-in looped GPT is `operators.model:build_looped_gpt` with body `body`.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from operators.tasks import make_task

DEFAULT_FACTORY = "operators.model:build_looped_gpt"
DEFAULT_BODY = "body"
DEFAULT_LOSS = "operators.model:per_example_loss"
# Keys of the `model` section that describe the interface rather than the model's shape;
# they are not passed to the factory.
INTERFACE_KEYS = ("factory", "body", "loss", "options")


class ModelSpecError(ValueError):
    """A model factory, body path or loss cannot be resolved or does not fit the pipeline."""


@dataclass
class ModelSpec:
    """How to build a model and which of its parts the pipeline attributes.

    `config` is the dict the factory receives: the `model` section without the interface
    keys, with `model.options` merged in, and `vocab_size` and `context_length` from the task.
    """

    factory: str = DEFAULT_FACTORY
    body: str = DEFAULT_BODY
    loss: str = DEFAULT_LOSS
    tau: int = 4
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> ModelSpec:
        """Rebuild the spec recorded in a checkpoint's meta.json.

        Checkpoints written before the factory interface existed hold only `model_config`
        (a looped GPT shape); they load with the built-in factory.
        """
        recorded = dict(meta.get("model") or {})
        model_config = dict(meta["model_config"])
        return cls(
            factory=recorded.get("factory", DEFAULT_FACTORY),
            body=recorded.get("body", DEFAULT_BODY),
            loss=recorded.get("loss", DEFAULT_LOSS),
            tau=int(recorded.get("tau", model_config.get("tau", 1))),
            config=model_config,
        )


def model_spec(config: DictConfig) -> ModelSpec:
    """Return the model spec of a pipeline configuration (vocabulary and context from the task)."""
    task = make_task(config.task)
    section = OmegaConf.to_container(config.model, resolve=True)
    options = section.get("options") or {}
    shape = {key: value for key, value in section.items() if key not in INTERFACE_KEYS}
    clashes = sorted(set(options) & (set(shape) | {"vocab_size", "context_length"}))
    if clashes:
        raise ModelSpecError(
            f"model.options sets {clashes}, which are model keys already; set them as "
            f"model.<key> instead"
        )
    factory_config = {
        "vocab_size": task.vocab_size,
        "context_length": task.context_length,
        **shape,
        **options,
    }
    return ModelSpec(
        factory=section["factory"],
        body=section["body"],
        loss=section["loss"],
        tau=int(section["tau"]),
        config=factory_config,
    )


@functools.lru_cache(maxsize=64)
def import_object(path: str, role: str = "object") -> Any:
    """Import `package.module:attribute` (the attribute may be dotted) and return it."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ModelSpecError(
            f"{role} {path!r} is not an import path of the form 'package.module:attribute'"
        )
    try:
        target: Any = _import_module(module_name)
    except ImportError as error:
        raise ModelSpecError(
            f"{role} {path!r}: module {module_name!r} cannot be imported ({error}); install it "
            "on every node, or ship it with the job (`sdi submit` uploads its working directory)"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"{role} {path!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"{role} {path!r} is {type(target).__name__}, not a callable")
    return target


def _import_module(name: str) -> Any:
    """Import a module, also from the current directory as `python -m` and Ray workers do.

    The `sdi` console script does not put the current directory on sys.path, but Ray
    adds the driver's current directory to its local workers' sys.path.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        current = os.getcwd()
        if current in sys.path:
            raise
        sys.path.append(current)
        return importlib.import_module(name)


def build_model(spec: ModelSpec) -> nn.Module:
    """Call the spec's factory with its config dict and check that it returns an nn.Module."""
    factory = import_object(spec.factory, "model.factory")
    model = factory(dict(spec.config))
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model.factory {spec.factory!r} returned {type(model).__name__}; it must return a "
            "torch.nn.Module"
        )
    return model


def resolve_body(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at the dotted attribute path `path` (for example `body` or `core.cell`)."""
    target: Any = model
    for part in path.split("."):
        if not part or not hasattr(target, part):
            raise ModelSpecError(
                f"model.body {path!r}: {type(model).__name__} has no attribute path {path!r}; "
                "set model.body to the attribute that holds the shared (looped) module"
            )
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        raise ModelSpecError(
            f"model.body {path!r} is a {type(target).__name__}, not a torch.nn.Module"
        )
    return target


def resolve_loss(path: str) -> Any:
    """Return the per-example loss callable `loss(logits, targets, reduction)`."""
    return import_object(path, "model.loss")
