"""Styles for what is not a linear layer: an RMSNorm over sharded heads, and ALiBi slopes for local heads.

    ShardedNorm()      RMSNorm over the full q (or k) width of sharded heads (OLMo2): the sum of squares is
                       all-reduced, each rank keeps its slice of the weight
    AlibiHeads(kwarg)  BLOOM / MPT-style ALiBi bias built for all heads and passed to the attention as `kwarg`:
                       each rank keeps its heads' rows
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.comm import all_reduce_both_ways, sum_grad_over_sharers
from .base import PlanEntry, Style, need_heads, per_head
from ..runtime.layers import _shard_param
from ..sharding import ShardSpec


class _ShardedRMSNorm(nn.Module):
    """RMSNorm whose normalised dim is split over the TP group: the sum of squares is all-reduced.

    With replicated KV heads (a k norm at tp > kv) every KV head sits on `replicas` ranks: the all-reduced
    sum counts it that many times, so it is divided by `replicas`, and the weight's gradient is summed over
    the ranks that hold the same rows (as for the replicated k projection itself)."""

    def __init__(self, norm: nn.Module, spec: ShardSpec, group, eps: float, replicas: int):
        super().__init__()
        self.group, self.spec, self.eps, self.replicas = group, spec, eps, replicas
        self.weight = _shard_param(norm.weight, spec, replicas=replicas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        sq = all_reduce_both_ways(x.pow(2).sum(-1, keepdim=True), self.group) / self.replicas
        x = x * torch.rsqrt(sq / self.spec.full_size + self.eps)
        weight = self.weight
        if self.replicas > 1:
            weight = sum_grad_over_sharers(weight, self.group, self.spec.ranges, self.spec.full_size)
        return weight * x.to(dtype)


class ShardedNorm(Style):
    """An RMSNorm applied to the full q (kind "q") or k ("kv") projection of sharded heads (OLMo2)."""
    extra_collectives = "q/k norms over split heads (sum of squares all-reduced)"

    def __init__(self, kind: str = "q"):
        self.kind = kind

    def __repr__(self) -> str:
        return f"ShardedNorm({self.kind!r})"

    def plan_entry(self, path, module, tp, attn):
        need_heads(path, self, attn)
        width = module.weight.shape[0]
        heads = attn.num_heads if self.kind == "q" else attn.num_kv_heads
        per = per_head(path, width, heads)
        ranges = [h.q_heads if self.kind == "q" else h.kv_heads for h in attn.heads]
        specs = [{"weight": ShardSpec(0, width, ((a * per, b * per),))} for a, b in ranges]
        replicas = ranges.count(ranges[0]) if self.kind == "kv" else 1  # tp // kv when KV heads are replicated
        return PlanEntry(path, self, {"weight": (width,)}, specs, shared_rows=replicas > 1,
                         resolved={"replicas": replicas})

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return _ShardedRMSNorm(module, entry.specs[rank]["weight"], group, eps, entry.resolved["replicas"])


class AlibiHeads(Style):
    """On an attention module that receives an ALiBi bias for all heads as `kwarg`, keep this rank's heads' rows:
    BLOOM's `alibi` [batch * heads, 1, kv] and MPT's `position_bias` [heads, q, kv] alike (heads-major)."""

    def __init__(self, kwarg: str = "alibi"):
        self.kwarg = kwarg

    def __repr__(self) -> str:
        return f"AlibiHeads({self.kwarg!r})"

    def plan_entry(self, path, module, tp, attn):
        need_heads(path, self, attn)
        return PlanEntry(path, self, {}, [{} for _ in range(tp)],
                         resolved={"heads": [h.q_heads for h in attn.heads], "num_heads": attn.num_heads})

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        a, b = entry.resolved["heads"][rank]
        num_heads, kwarg = entry.resolved["num_heads"], self.kwarg

        def hook(mod, args, kwargs):
            bias = kwargs.get(kwarg)
            if bias is None:
                return args, kwargs
            full = bias.reshape(-1, num_heads, *bias.shape[1:])  # [batch or 1, heads, ...]
            kwargs[kwarg] = full[:, a:b].reshape(-1, *bias.shape[1:])
            return args, kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module
