"""DoRA (`LoraConfig(use_dora=True)`) on tp_plugin's column- and row-parallel linears.

PEFT's DoRA output is `m / ||W + s B A|| * (W x + s B A x) + bias`, the norm taken per output feature over the
input dim and detached (DoRA paper, section 4.3). What the split changes:

    column-parallel  W [out_local, in]:  every local row is whole, so its norm is complete; the magnitude m is split
                                          with the rows (like B). PEFT's own `DoraLinearLayer`.
    row-parallel     W [out, in_local]:  each rank holds part of every row: the squared norms are summed over the TP
                                          group (one all-reduce of an [out] vector per forward, none when PEFT's DoRA
                                          caching serves it); m is replicated, its gradient complete on every rank.

Reused from PEFT: `DoraLinearLayer` (lora weight, weight norm, its cache, the magnitude's creation) and
`DoraLinearVariant`'s merge / unmerge, which call `get_weight_norm`, so merging a row layer sums the norm over the
group too (every rank merges, as every rank runs the forward). Overridden, because they see the split: the
variant's `init` (PEFT runs it while the factors still have their full size; it runs once they are sliced), the
row layer's norm, and the two forwards (they place the collectives).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer, cache_decorator
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.other import transpose
from torch import nn

from ...runtime.comm import all_reduce, copy_to_tp, sum_grad_over_sharers
from ...runtime.layers import tag_param
from ...sharding import ShardSpec


class RowDoraLayer(DoraLinearLayer):
    """PEFT's DoRA layer for a row-parallel base: the weight norm is summed over the TP group's input columns."""

    def __init__(self, fan_in_fan_out: bool, group):
        super().__init__(fan_in_fan_out)
        self.group = group

    @cache_decorator("weight-norm")
    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name: Optional[str] = None) -> torch.Tensor:
        weight = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight         # [out, in_local]
        # Every caller detaches the norm (DoRA treats it as a constant), so a plain collective will do.
        squares = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32).square()   # [out]
        if not squares.is_meta and dist.get_world_size(self.group) > 1:   # meta: PEFT's low_cpu_mem_usage init
            squares = all_reduce(squares, self.group)
        return squares.sqrt().to(weight.dtype)

    def __repr__(self) -> str:
        return "tp_" + super().__repr__()


class TPDoraVariant(DoraLinearVariant):
    """PEFT's DoRA variant (merge, unmerge) whose init waits for the sliced factors (see `init_split`)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        # Called by PEFT's update_layer while A and B still have their full, unsplit size; the TP layer calls
        # init_split right after slicing them.
        return None

    @staticmethod
    def init_split(module, adapter_name: str, row: bool) -> None:
        """The magnitude from this rank's factors and base shard: split with the rows, or replicated (row)."""
        base = module.get_base_layer()  # (a linear's shard has no padding rows, whose zero norm DoRA divides by)
        if not module.lora_magnitude_vector:  # first DoRA adapter: its magnitude is an adapter weight (as in PEFT)
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        fan_in_fan_out = base.transposed  # (module.fan_in_fan_out is set to it only after PEFT's __init__)
        dora = RowDoraLayer(fan_in_fan_out, base.group) if row else DoraLinearLayer(fan_in_fan_out)
        dora.update_layer(base_layer=base, lora_A=module.lora_A[adapter_name].weight,
                          lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
        spec = None if row else ShardSpec(0, base.spec.full_size, base.spec.ranges)
        tag_param(dora.weight, spec, replicas=1 if row else getattr(base.weight, "tp_replicas", 1))
        module.lora_magnitude_vector[adapter_name] = dora


def column_forward(module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """PEFT's `DoraLinearLayer.forward` on this rank's output rows (x: the input as the base layer computes with
    it, result: the base's local output). A's gradient is a partial sum over the ranks (all-reduced, as in plain
    LoRA); replicated KV rows sum the gradients of B, m and the base bias over the ranks holding them."""
    base = module.get_base_layer()
    lora_a, lora_b, dora = module.lora_A[name], module.lora_B[name], module.lora_magnitude_vector[name]
    dropout, scaling = module.lora_dropout[name], module.scaling[name]
    x = module._cast_input_dtype(x, lora_a.weight.dtype)
    weight = base.weight.to(x.dtype)  # frozen under PEFT: no gradient to sum over sharers
    magnitude, b_weight, bias = dora.weight, lora_b.weight, base.bias   # (PEFT refuses lora_bias with DoRA)
    if base.shared_rows:
        ranges, full = base.spec.ranges, base.spec.full_size
        magnitude, b_weight = (sum_grad_over_sharers(t, base.group, ranges, full) for t in (magnitude, b_weight))
        if bias is not None:  # trainable with bias="all": its gradient through the DoRA term too
            bias = sum_grad_over_sharers(bias, base.group, ranges, full)
    if isinstance(dropout, nn.Identity) or not module.training:
        base_result = result if bias is None else result - bias
    else:
        x = dropout(x)
        base_result = F.linear(x, transpose(weight, dora.fan_in_fan_out))
    lora_weight = dora.get_lora_weight(lora_A=lora_a, lora_B=lora_b, adapter_name=name).to(x.dtype)
    norm = dora.get_weight_norm(weight=weight, lora_weight=lora_weight.detach(), scaling=scaling,
                                adapter_name=name).detach()
    scale = (magnitude / norm).view(1, -1)                                             # [1, out_local]
    lora_result = F.linear(F.linear(x, copy_to_tp(lora_a.weight, base.group)), b_weight)
    return result + (scale - 1) * base_result + scale * lora_result * scaling


def row_forward(module, name: str, x: torch.Tensor) -> torch.Tensor:
    """DoRA on a row-parallel layer: `m / norm * (W x + s B A x) + bias`, with every partial product
    (over this rank's input columns) summed in the base layer's one reduction, then scaled by the replicated m.

    With dropout PEFT applies the DoRA terms to the dropped-out input and keeps the base term on the clean one:
    `W x + (scale - 1) W d + scale s B A d`; the two partial sums `W (x - d)` and `W d + s B A d` then travel in
    that one reduction side by side ([..., 2 out])."""
    base = module.get_base_layer()
    lora_a, lora_b, dora = module.lora_A[name], module.lora_B[name], module.lora_magnitude_vector[name]
    dropout, scaling = module.lora_dropout[name], module.scaling[name]
    x = module._cast_input_dtype(x, lora_a.weight.dtype)
    tokens_only = base.sequence is not None and base.sequence.active()  # SP: m sees this rank's tokens
    magnitude = copy_to_tp(dora.weight, base.group) if tokens_only else dora.weight
    b_weight = copy_to_tp(lora_b.weight, base.group)       # B's input A_local x_local is partial: sum its gradient
    clean = isinstance(dropout, nn.Identity) or not module.training
    d = x if clean else dropout(x)
    adapted = base.partial_output(d) + F.linear(lora_a(d), b_weight) * scaling          # [..., out], partial
    partial = adapted if clean else torch.cat([base.partial_output(x - d), adapted], dim=-1)
    reduced = base.reduce(partial, add_bias=False)  # the bias is added after the DoRA scaling
    lora_weight = dora.get_lora_weight(lora_A=lora_a, lora_B=lora_b, adapter_name=name).to(x.dtype)
    norm = dora.get_weight_norm(weight=base.weight.to(x.dtype), lora_weight=lora_weight.detach(), scaling=scaling,
                                adapter_name=name).detach()                           # [out], summed over the group
    scale = magnitude / norm
    rest, adapted = (None, reduced) if clean else reduced.split(reduced.shape[-1] // 2, dim=-1)
    out = scale * adapted if rest is None else rest + scale * adapted
    return out if base.bias is None else out + base.bias
