"""Gradient hooks of a split model's parameters, kept through wrappers that replace the parameters.

Some parameters need their gradient changed before anything reads it: replicated parameters that see part of
the work (summed over the TP group), Mamba-2's shared B/C rows (summed over their holders), parameters that see
this rank's tokens only under sequence parallelism. Each such hook is registered with `add_grad_hook`, which
also records it on the parameter (`tp_grad_hooks`).

FSDP2 (`fully_shard`) replaces every parameter by a sharded one and, for each forward and backward, puts an
unsharded parameter in its place (one object per parameter, reused every step); hooks registered on the
original parameter would never run, silently. `carry_grad_hooks(model, hooks)` gives each owning module a
forward pre-hook that registers the recorded hooks on whatever tensor the module holds when it runs (once per
tensor object), so they act on the gradients FSDP2 then reduces over the data-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GradHook = Callable[[torch.Tensor], torch.Tensor]


def add_grad_hook(param: torch.Tensor, hook: GradHook) -> None:
    """`param.register_hook(hook)`, recorded on the parameter so that `carry_grad_hooks` can re-install it."""
    param.register_hook(hook)
    hooks = getattr(param, "tp_grad_hooks", None)
    if hooks is None:
        hooks = param.tp_grad_hooks = []
    hooks.append(hook)


def recorded_hooks(model: nn.Module) -> dict[tuple[nn.Module, str], list[GradHook]]:
    """(owning module, parameter name) -> the hooks recorded on that parameter."""
    found = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if getattr(param, "tp_grad_hooks", None):
                found[(module, name)] = list(param.tp_grad_hooks)
    return found


class _Rehook:
    """A forward pre-hook: register `hooks` on the module's current `name` tensor if it does not have them."""

    def __init__(self, names_and_hooks: list[tuple[str, list[GradHook]]]):
        self.names_and_hooks = names_and_hooks

    def __call__(self, module: nn.Module, args) -> None:
        for name, hooks in self.names_and_hooks:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad \
                    and getattr(tensor, "_tp_hooks_carried", None) is not hooks:
                for hook in hooks:
                    tensor.register_hook(hook)
                tensor._tp_hooks_carried = hooks


def carry_grad_hooks(hooks: dict[tuple[nn.Module, str], list[GradHook]]) -> None:
    """After a wrapper replaced the parameters: install `_Rehook` on every module that owned hooked ones."""
    per_module: dict[nn.Module, list] = {}
    for (module, name), fns in hooks.items():
        per_module.setdefault(module, []).append((name, fns))
    for module, entries in per_module.items():
        module.register_forward_pre_hook(_Rehook(entries))
