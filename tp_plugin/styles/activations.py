"""Statistics an MLP takes over its intermediate features, which a column-parallel split leaves on each rank in part.

    ActivationSparsity()   Gemma 3n's Gaussian top-k: `relu(x - (mean(x) + std(x) * z))` over the intermediate
                           dim; split, each rank would use its own slice's mean and std. The sum and the sum of
                           squares are all-reduced (one [tokens, 2] all-reduce each way), so every rank cuts at the
                           mean and standard deviation of all features.
"""

from __future__ import annotations

import types

import torch

from ..runtime.comm import all_reduce_both_ways
from .base import PlanEntry, Style
from ..sharding import TPSplitError


def has_activation_sparsity(module) -> bool:
    return callable(getattr(module, "_gaussian_topk", None)) and \
        isinstance(getattr(module, "activation_sparsity", None), float) and \
        isinstance(getattr(module, "intermediate_size", None), int)


class ActivationSparsity(Style):
    """On an MLP whose gate is column-parallel and which applies `_gaussian_topk` to it (see the module docstring)."""
    extra_collectives = "activation sparsity statistics over the split intermediate dim (all-reduced both ways)"

    def plan_entry(self, path, module, tp, attn):
        if not has_activation_sparsity(module):
            raise TPSplitError(f"{path}: ActivationSparsity expects an MLP with `_gaussian_topk`, "
                               f"`activation_sparsity` and `intermediate_size` ({type(module).__name__})")
        return PlanEntry(path, self, {}, [{} for _ in range(tp)], resolved={"width": module.intermediate_size})

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        module.tp_full_width, module.tp_group = entry.resolved["width"], group
        module._gaussian_topk = types.MethodType(_gaussian_topk_over_all_features, module)
        return module


def _gaussian_topk_over_all_features(self, inputs: torch.Tensor) -> torch.Tensor:
    target = torch.tensor(self.activation_sparsity, dtype=torch.float32, device=inputs.device)
    std_multiplier = torch.distributions.normal.Normal(0, 1).icdf(target).type(inputs.dtype)
    sums = torch.stack([inputs.sum(-1), inputs.pow(2).sum(-1)], dim=-1)
    sums = all_reduce_both_ways(sums, self.tp_group) / self.tp_full_width
    mean = sums[..., :1]
    std = (sums[..., 1:] - mean * mean).clamp_min(0).sqrt()  # the population std, as torch.std(unbiased=False)
    return torch.nn.functional.relu(inputs - (mean + std * std_multiplier))
