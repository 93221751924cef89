"""Per-step gradient capture for the shared body of a looped model.

For every use of a body module in the forward pass, the capture records the module's
input and, during backpropagation, its output gradient. From those two factors the
per-example gradient of each parameter at loop step t follows without ever forming the
batch gradient:

- Linear weight: sum over tokens of d a^T; Linear bias: sum over tokens of d;
- LayerNorm weight: sum over tokens of d * x_hat; LayerNorm bias: sum over tokens of d;

where a is the module input, d the gradient of the loss at the module output, and x_hat
the normalised LayerNorm input. Backward hooks fire in reverse order; each use is tagged
with its loop step (counted from body calls in forward order), so consumers always see
steps 1..tau.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class CaptureError(RuntimeError):
    """The body's structure or its use in the forward pass does not allow per-step capture."""


@dataclass(frozen=True)
class ParameterSpec:
    """One body parameter as recorded by the capture.

    `name` is relative to the body module (`layers.0.attn.qkv.weight`); `role` is one of
    `linear.weight`, `linear.bias`, `layernorm.weight`, `layernorm.bias`.
    """

    name: str
    role: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ModuleUse:
    """Factors of one use of a body module at one loop step (1-based).

    `inputs` is (batch, tokens, in_features) for Linear and the normalised input x_hat for
    LayerNorm; `grad_output` is (batch, tokens, out_features).
    """

    module_name: str
    step: int
    inputs: torch.Tensor
    grad_output: torch.Tensor


# Called once per module use during backpropagation.
UseConsumer = Callable[[ModuleUse], None]


def body_parameter_specs(body: nn.Module) -> tuple[list[ParameterSpec], dict[str, list[int]]]:
    """List the body's trainable parameters in a fixed order, and map modules to them.

    Returns the specs (module registration order, weight before bias) and, for each hooked
    module name, the indices of its specs. Raises CaptureError when a trainable parameter
    is held by a module the capture cannot see (anything but nn.Linear and nn.LayerNorm),
    or when one parameter tensor is shared between body modules.
    """
    specs: list[ParameterSpec] = []
    module_specs: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for module_name, module in body.named_modules():
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.LayerNorm):
            kind = "layernorm"
        else:
            continue
        indices = []
        for attribute in ("weight", "bias"):
            parameter = getattr(module, attribute, None)
            if parameter is None or not parameter.requires_grad:
                continue
            name = f"{module_name}.{attribute}" if module_name else attribute
            if id(parameter) in owner:
                raise CaptureError(
                    f"body parameter {name} is the same tensor as {owner[id(parameter)]}; "
                    "weights shared between body modules are not supported, tie them "
                    "outside the body or give each module its own parameter"
                )
            owner[id(parameter)] = name
            indices.append(len(specs))
            specs.append(ParameterSpec(name, f"{kind}.{attribute}", tuple(parameter.shape)))
        if indices:
            module_specs[module_name] = indices

    uncovered = [
        name
        for name, parameter in body.named_parameters()
        if parameter.requires_grad and id(parameter) not in owner
    ]
    if uncovered:
        raise CaptureError(
            f"body parameters {uncovered} are not held by an nn.Linear or nn.LayerNorm, so "
            "their per-step gradients cannot be captured; move them into such modules or "
            "freeze them (requires_grad=False)"
        )
    if not specs:
        raise CaptureError("the body has no trainable nn.Linear or nn.LayerNorm parameters")
    return specs, module_specs


class StepCapture:
    """Context manager that hooks a body and reports every module use to a consumer.

    Use it around one forward pass and one backward pass:

        with StepCapture(model.body, tau, consumer) as capture:
            logits = model(input_ids)
            capture.check_forward()
            loss.backward()  # or torch.autograd.grad(loss, capture.first_input)
    """

    def __init__(self, body: nn.Module, tau: int, consumer: UseConsumer) -> None:
        self.body = body
        self.tau = tau
        self.consumer = consumer
        self.specs, self.module_specs = body_parameter_specs(body)
        self.step = 0
        self.inside_body = False
        self.first_input: torch.Tensor | None = None
        self.uses: dict[str, list[int]] = {}
        self._handles: list = []

    def __enter__(self) -> StepCapture:
        self._handles.append(self.body.register_forward_pre_hook(self._enter_body))
        self._handles.append(self.body.register_forward_hook(self._leave_body))
        modules = dict(self.body.named_modules())
        for module_name in self.module_specs:
            hook = self._make_hook(module_name, modules[module_name])
            self._handles.append(modules[module_name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter_body(self, module: nn.Module, args: tuple) -> None:
        self.step += 1
        self.inside_body = True
        if self.step == 1 and args and isinstance(args[0], torch.Tensor):
            self.first_input = args[0]

    def _leave_body(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.inside_body = False

    def _make_hook(self, module_name: str, module: nn.Module) -> Callable:
        is_layernorm = isinstance(module, nn.LayerNorm)

        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.inside_body:
                raise CaptureError(
                    f"body module {module_name!r} was called outside the body's forward; "
                    "every use of a body parameter must happen inside a call of the body"
                )
            step = self.step
            self.uses.setdefault(module_name, [0] * (self.tau + 1))
            if step <= self.tau:
                self.uses[module_name][step] += 1
            if not output.requires_grad:
                return
            inputs = args[0].detach()
            if is_layernorm:
                inputs = _normalise(inputs, module)

            def grad_hook(grad: torch.Tensor) -> None:
                self.consumer(ModuleUse(module_name, step, inputs, grad.detach()))

            output.register_hook(grad_hook)

        return forward_hook

    def check_forward(self) -> None:
        """Raise CaptureError unless the body ran tau times and every module ran in each step."""
        if self.step != self.tau:
            raise CaptureError(
                f"the body ran {self.step} times in one forward pass but tau={self.tau}; "
                "set model.tau to the number of loop steps the model takes, and route every "
                "step through the body module"
            )
        for module_name, indices in self.module_specs.items():
            counts = self.uses.get(module_name, [0] * (self.tau + 1))[1:]
            if any(count == 0 for count in counts):
                names = [self.specs[i].name for i in indices]
                raise CaptureError(
                    f"parameters {names} were used {sum(counts)} times in {self.tau} loop "
                    f"steps (per step: {counts}); each body parameter must be used in every "
                    "step. A module called through its weight directly (for example the "
                    "output projection of nn.MultiheadAttention) never fires its hooks: "
                    "replace it with a module that calls nn.Linear"
                )


def _normalise(x: torch.Tensor, module: nn.LayerNorm) -> torch.Tensor:
    """Return the LayerNorm input normalised over its last dimension (x_hat), in float32 or wider."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # layer_norm without affine is exactly (x - mean) / sqrt(var + eps), in one fused kernel
    # (x.var alone took about 10% of a narrow model's sketch stage).
    return torch.nn.functional.layer_norm(x.to(dtype), x.shape[-1:], eps=module.eps)
