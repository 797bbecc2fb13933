"""Fused 3-D MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) split along the intermediate dim I: every
expert's MLP is split like a dense MLP, so all experts live on every rank (no expert routing or load imbalance
between ranks); the router stays replicated."""

from __future__ import annotations

import copy

import torch

from ..entry import PlanEntry
from ..layers import _shard_param
from ..regions import RegionInputs
from ..sharding import ShardSpec, TPSplitError, even_ranges
from .base import Style


class Experts(Style):
    """Fused 3-D MoE experts split along the intermediate dim I (see the module docstring).

    The experts module is a region (`tp_plugin.regions`): forward, the partial outputs of every rank are
    all-reduced once (like a row-parallel down_proj); backward, the gradients of the experts' inputs (hidden
    states and routing weights) are all-reduced once each, so the replicated router gets full, identical
    gradients on every rank. Under sequence parallelism the inputs (and the chosen experts) are all-gathered
    over the tokens and the output reduce-scattered back to this rank's tokens.
    """

    region = RegionInputs(activations=((0, "hidden_states"), (2, "top_k_weights")), ids=((1, "top_k_index"),),
                          reduce_output=True, columns_only=True)

    def plan_entry(self, path, module, tp, attn):
        if getattr(module, "has_bias", False) or getattr(module, "down_proj_bias", None) is not None:
            raise TPSplitError(f"{path}: MoE experts with biases ({type(module).__name__}) are not supported: the "
                               f"down_proj bias would be added once per rank. Register a policy that keeps "
                               f"{path} replicated (Policy(replicate=...)).")
        down = getattr(module, "down_proj", None)
        up_name = "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else "up_proj"
        up = getattr(module, up_name, None)
        if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor) or down.dim() != 3:
            raise TPSplitError(f"{path}: Experts() expects 3-D `gate_up_proj`/`up_proj` and `down_proj` parameters "
                               f"on {type(module).__name__}")
        transposed = bool(getattr(module, "is_transposed", False))
        up_dim, down_dim = (2, 1) if transposed else (1, 2)
        inter = down.shape[down_dim]
        gated = up_name == "gate_up_proj"
        if up.shape[up_dim] != (2 if gated else 1) * inter:
            raise TPSplitError(f"{path}: {up_name} {tuple(up.shape)} does not match down_proj {tuple(down.shape)}")
        concatenated = getattr(module, "is_concatenated", True)
        per_rank = []
        # split in units of 4 rows when I allows it: every shard keeps 16-byte aligned strides (grouped_mm)
        unit = 4 if inter % 4 == 0 and inter // 4 >= tp else 1
        for a, b in even_ranges(inter // unit, tp, what=f"{path} (intermediate size {inter})"):
            a, b = a * unit, b * unit
            if not gated:
                up_ranges = ((a, b),)
            elif concatenated:  # [gate; up]: this rank's rows of each part
                up_ranges = ((a, b), (inter + a, inter + b))
            else:  # interleaved [g0, u0, g1, u1, ...]
                up_ranges = ((2 * a, 2 * b),)
            per_rank.append({up_name: ShardSpec(up_dim, up.shape[up_dim], up_ranges),
                             "down_proj": ShardSpec(down_dim, inter, ((a, b),))})
        full = {up_name: tuple(up.shape), "down_proj": tuple(down.shape)}
        return PlanEntry(path, self, full, per_rank)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        for name, spec in entry.specs[rank].items():
            setattr(module, name, _shard_param(getattr(module, name), spec))
        local = entry.specs[rank]["down_proj"].local_size
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, local)
        config = getattr(module, "config", None)
        if config is not None and (local * module.down_proj.element_size()) % 16:
            # torch's grouped_mm needs 16-byte aligned strides; an uneven split (e.g. I=50 -> 25) is not, so
            # this module alone runs the eager per-expert loop (same math) on its own copy of the config
            config = copy.copy(config)
            config._experts_implementation = "eager"
            module.config = config
        return module  # the split applies `region`: inputs synced or gathered, output reduced
