"""The autograd collectives of tensor parallelism, each paired with its dual in backward (Megatron's f and g).

Every op is the identity when the group has a single rank, so a tp=1 model pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _world(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group: ProcessGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A plain (non-autograd) all-reduce, in place when `tensor` is contiguous; returns the reduced tensor."""
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


_all_reduce = all_reduce


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # A clone: autograd may hand the same gradient tensor to several consumers.
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # `x` is the fresh output of a local matmul, so reducing it in place is safe; marking it dirty tells
        # autograd so, and the caller may then modify the result in place (Falcon's `mlp_output += attn`).
        if not x.is_contiguous():
            return _all_reduce(x, group)  # a contiguous copy: a new tensor
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.size = group, x.shape[-1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.narrow(-1, rank * ctx.size, ctx.size).contiguous(), None


class _SumGradOverSharers(torch.autograd.Function):
    """Identity on a replicated-KV weight shard; backward sums its gradient over the ranks holding the same rows.

    Each rank writes its gradient into its rows of a zero buffer of the full size, one all-reduce over the TP
    group adds the holders' contributions (different heads land in different rows), and each rank reads its
    rows back. One collective per shared tensor per backward, no sub-groups to create.
    """

    @staticmethod
    def forward(ctx, shard, group, ranges, full_size):
        ctx.group, ctx.ranges, ctx.full_size = group, ranges, full_size
        return shard.view_as(shard)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros((ctx.full_size, *grad.shape[1:]))
        offset = 0
        for a, b in ctx.ranges:
            full[a:b] += grad[offset:offset + b - a]
            offset += b - a
        _all_reduce(full, ctx.group)
        return torch.cat([full[a:b] for a, b in ctx.ranges]), None, None, None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce of the input gradient (enter a column-parallel region)."""
    return x if _world(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: all-reduce of partial outputs. Backward: identity (leave a row-parallel region)."""
    if _world(group) == 1:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        # No graph to record (generate, eval under no_grad): the bare collective. torch.compile traces it, where
        # it cannot trace the autograd function's mark_dirty outside a differentiable region (a graph break).
        return all_reduce(x, group)
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: all-gather of equal-size shards along the last dim. Backward: keep the local slice."""
    return x if _world(group) == 1 else _GatherFromTP.apply(x, group)


def sum_grad_over_sharers(shard: torch.Tensor, group: ProcessGroup, ranges, full_size: int) -> torch.Tensor:
    """Forward: identity. Backward: gradient summed over the TP ranks that hold the same rows."""
    return shard if _world(group) == 1 else _SumGradOverSharers.apply(shard, group, ranges, full_size)
