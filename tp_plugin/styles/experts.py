"""Fused 3-D MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) split along the intermediate dim I: every
expert's MLP is split like a dense MLP, so all experts live on every rank (no expert routing or load imbalance
between ranks); the router stays replicated.

Experts with biases (gpt-oss): the up-projection's bias is split with its rows; the down-projection's bias
(`down_proj_bias[e]`, added to each chosen expert's output times its routing weight) would be added once per rank
to partial sums, so it is taken out of the experts' forward and added once after the region's reduction,
`sum_k w_k * down_proj_bias[e_k]`: no extra collective, and the same gradient on every rank. Zero (identity)
experts (LongCat-Flash) are weighted on rank 0 only, for the same reason."""

from __future__ import annotations

import copy
import types

import torch

from .base import PlanEntry, Style
from ..runtime.layers import _shard_param
from ..runtime.regions import RegionInputs
from ..sharding import ShardSpec, TPSplitError, even_ranges


class Experts(Style):
    """Fused 3-D MoE experts split along the intermediate dim I (see the module docstring).

    The experts module is a region (`tp_plugin.runtime.regions`): forward, the partial outputs of every rank are
    all-reduced once (like a row-parallel down_proj); backward, the gradients of the experts' inputs (hidden
    states and routing weights) are all-reduced once each, so the replicated router gets full, identical
    gradients on every rank. Under sequence parallelism the inputs (and the chosen experts) are all-gathered
    over the tokens and the output reduce-scattered back to this rank's tokens.
    """
    extra_collectives = "MoE routing weights (their gradient reduced)"

    region = RegionInputs(activations=((0, "hidden_states"), (2, "top_k_weights")), ids=((1, "top_k_index"),),
                          reduce_output=True, columns_only=True)

    def plan_entry(self, path, module, tp, attn):
        down = getattr(module, "down_proj", None)
        up_name = "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else "up_proj"
        up = getattr(module, up_name, None)
        if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor) or down.dim() != 3:
            raise TPSplitError(f"{path}: Experts() expects 3-D `gate_up_proj`/`up_proj` and `down_proj` parameters "
                               f"on {type(module).__name__}")
        transposed = getattr(module, "is_transposed", None)
        if transposed is None:  # no flag (Llama 4): [E, H, 2I] / [E, I, H] when only that reading fits
            transposed = down.shape[2] == up.shape[1] and down.shape[1] != up.shape[2]
        transposed = bool(transposed)
        up_dim, down_dim = (2, 1) if transposed else (1, 2)
        inter = down.shape[down_dim]
        gated = up_name == "gate_up_proj"
        if up.shape[up_dim] != (2 if gated else 1) * inter:
            raise TPSplitError(f"{path}: {up_name} {tuple(up.shape)} does not match down_proj {tuple(down.shape)}")
        concatenated = getattr(module, "is_concatenated", True)
        biased = _check_biases(path, module, up_name, up.shape[up_dim], down.shape[0], down.shape[3 - down_dim])
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
            if biased:
                per_rank[-1][f"{up_name}_bias"] = ShardSpec(1, up.shape[up_dim], up_ranges)
        full = {up_name: tuple(up.shape), "down_proj": tuple(down.shape)}
        if biased:  # down_proj_bias stays whole (replicated): added once, after the reduction
            full[f"{up_name}_bias"] = tuple(getattr(module, f"{up_name}_bias").shape)
        return PlanEntry(path, self, full, per_rank, resolved={"down_bias": biased})

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
        if entry.resolved.get("down_bias"):
            module.forward = types.MethodType(_forward_without_down_bias, module)
            module.tp_after_reduce = types.MethodType(_add_down_bias, module)
        if getattr(module, "zero_expert_num", 0) and rank != 0:
            module.forward = types.MethodType(_forward_zero_experts_on_rank0, module)
        return module  # the split applies `region`: inputs synced or gathered, output reduced


def _check_biases(path: str, module, up_name: str, up_width: int, experts: int, hidden: int) -> bool:
    """Whether the experts carry biases, checked against the layout `_add_down_bias` relies on."""
    up_bias, down_bias = getattr(module, f"{up_name}_bias", None), getattr(module, "down_proj_bias", None)
    if up_bias is None and down_bias is None and not getattr(module, "has_bias", False):
        return False
    if not isinstance(up_bias, torch.Tensor) or tuple(up_bias.shape) != (experts, up_width) or \
            not isinstance(down_bias, torch.Tensor) or tuple(down_bias.shape) != (experts, hidden):
        raise TPSplitError(
            f"{path}: experts with biases need {up_name}_bias [{experts}, {up_width}] and down_proj_bias "
            f"[{experts}, {hidden}] on {type(module).__name__} (found "
            f"{None if up_bias is None else tuple(up_bias.shape)} and "
            f"{None if down_bias is None else tuple(down_bias.shape)}); keep {path} replicated "
            f"(Policy(replicate=...))")
    return True


def _forward_zero_experts_on_rank0(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """LongCat-Flash's zero (identity) experts return their input: summed over ranks it would count tp times, so
    ranks other than 0 give them no weight. Applied inside the region (after its inputs are synced), so the
    routing weights' gradient, all-reduced on the way out, still carries rank 0's share once."""
    routed = (top_k_index < self.num_routed_experts).to(top_k_weights.dtype)
    return type(self).forward(self, hidden_states, top_k_index, top_k_weights * routed, *args, **kwargs)


def _forward_without_down_bias(self, *args, **kwargs):
    """The model's own experts forward with `down_proj_bias` read as zeros (the bias is added after the
    reduction). The parameter stays registered under its name: checkpoints and optimizers see it unchanged."""
    params = self._parameters
    bias = params["down_proj_bias"]
    params["down_proj_bias"] = torch.zeros_like(bias, requires_grad=False)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        params["down_proj_bias"] = bias


def _add_down_bias(self, args, kwargs, reduced, sp):
    """`reduced` (the whole experts' output, or this rank's tokens of it under sequence parallelism) plus each
    token's `sum_k w_k * down_proj_bias[e_k]`. `args` are the region's inputs as the caller passed them (this
    rank's tokens under sequence parallelism, not the synced copies: their gradients need no reduction)."""
    ids = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
    if ids is None or weights is None or ids.shape != weights.shape:
        raise TPSplitError(f"{type(self).__name__}: the split experts add down_proj_bias after the reduction and "
                           f"need the chosen experts and their routing weights ([tokens, top_k] each) as the 2nd "
                           f"and 3rd inputs")
    if sp is not None and not getattr(self.down_proj_bias, "tp_sequence_partial_grad", False):
        sp.add_partial(self.down_proj_bias)  # each rank adds it to its own tokens: gradients summed over TP
    term = (weights.unsqueeze(-1) * self.down_proj_bias[ids]).sum(-2)
    return reduced + term.to(reduced.dtype)
