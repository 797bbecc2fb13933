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


class _AllReduceBothWays(torch.autograd.Function):
    """Forward: all-reduce. Backward: all-reduce (the sum feeds every rank's part of the loss)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None


def all_gather_along(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """A plain (non-autograd) all-gather of equal chunks, concatenated along `dim`."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherAlong(torch.autograd.Function):
    """Forward: all-gather of equal chunks along `dim`. Backward: reduce-scatter of the gradient along `dim`
    when the consumers' gradients are partial sums (a tensor-parallel region), else this rank's chunk of it
    (consumers that compute the same thing on every rank)."""

    @staticmethod
    def forward(ctx, x, dim, group, grad_is_partial):
        ctx.dim, ctx.group, ctx.partial, ctx.size = dim, group, grad_is_partial, x.shape[dim]
        return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.size, ctx.size).contiguous(), None, None, None


class _SplitAlong(torch.autograd.Function):
    """Forward: keep this rank's chunk along `dim` (no communication). Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        size = x.shape[dim] // world
        return x.narrow(dim, rank * size, size).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterAlong(torch.autograd.Function):
    """Forward: reduce-scatter along `dim` (sum, keep this rank's chunk). Backward: all-gather along `dim`."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim, ctx.group), None, None


GLOO_REDUCE_SCATTER_BY_ALL_REDUCE = True  # see start_reduce_scatter (tests switch it off to count the real collective)


class Pending:
    """A started (asynchronous) collective; `wait()` returns its result. Lets the caller compute meanwhile."""

    __slots__ = ("work", "finish")

    def __init__(self, work, finish):
        self.work, self.finish = work, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.finish()


def start_all_reduce(x: torch.Tensor, group: ProcessGroup) -> Pending:
    """An all-reduce (in place on `x`, which must be contiguous and the caller's own) started asynchronously."""
    return Pending(dist.all_reduce(x, group=group, async_op=True), lambda: x)


def start_reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup, *, own: bool = True) -> Pending:
    """A reduce-scatter along `dim` (sum, keep this rank's chunk) started asynchronously. `own`: `x` is the
    caller's to overwrite (else it is left as it is)."""
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"reduce-scatter along dim {dim}: size {x.shape[dim]} does not divide by {world} ranks")
    size = x.shape[dim] // world
    if GLOO_REDUCE_SCATTER_BY_ALL_REDUCE and str(dist.get_backend(group)) == "gloo":
        # gloo's reduce-scatter takes 1.5-3x as long as an all-reduce of the same tensor (measured on 2 CPU
        # ranks, 0.6-9 MiB: docs/how-it-splits.md, sequence parallelism); the all-reduce gives every rank the sum, of which
        # each keeps its chunk. NCCL's ring all-reduce *is* a reduce-scatter plus an all-gather: it keeps the real one.
        x = x.contiguous() if own else x.clone(memory_format=torch.contiguous_format)
        rank = dist.get_rank(group)
        return Pending(dist.all_reduce(x, group=group, async_op=True),
                       lambda: x.narrow(dim, rank * size, size).contiguous())
    chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[0])
    return Pending(dist.reduce_scatter(out, chunks, group=group, async_op=True), lambda: out)


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    return start_reduce_scatter(x, dim, group, own=False).wait()


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


def all_reduce_both_ways(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: all-reduce. Backward: all-reduce. For a statistic summed over the group that every rank then
    uses (a norm over a split dimension)."""
    return x if _world(group) == 1 else _AllReduceBothWays.apply(x, group)


def gather_along(x: torch.Tensor, dim: int, group: ProcessGroup, *, grad_is_partial: bool = True) -> torch.Tensor:
    """Forward: all-gather along `dim`. Backward: reduce-scatter along `dim` (sequence parallelism's entry into
    a column-parallel region), or with `grad_is_partial=False` just this rank's chunk (leaving sequence
    parallelism for replicated consumers, e.g. the LM head, which all-reduces its own input gradient)."""
    return x if _world(group) == 1 else _GatherAlong.apply(x, dim, group, grad_is_partial)


def split_along(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """Forward: this rank's chunk along `dim`. Backward: all-gather along `dim` (entering sequence parallelism
    from a replicated tensor)."""
    return x if _world(group) == 1 else _SplitAlong.apply(x, dim, group)


def reduce_scatter_along(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """Forward: reduce-scatter along `dim`. Backward: all-gather along `dim` (sequence parallelism's exit from a
    row-parallel layer)."""
    return x if _world(group) == 1 else _ReduceScatterAlong.apply(x, dim, group)


# ---- outside autograd: weights, gradients, fingerprints -------------------------------------------------------

def _backend_device(group: ProcessGroup, like: torch.Tensor) -> torch.device:
    """Where a collective on `group` can run for a tensor living on `like.device` (NCCL: CUDA only)."""
    if "nccl" in str(dist.get_backend(group)) and like.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


def broadcast_from_rank0(tensors: list[torch.Tensor], group: ProcessGroup) -> None:
    """Overwrite `tensors` (in place) with rank 0 of `group`'s, one flat broadcast per dtype, on a device the
    backend supports."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch._utils._flatten_dense_tensors(same)
        device = _backend_device(group, flat)
        moved = flat.to(device)
        dist.broadcast(moved, group=group, group_src=0)
        for t, synced in zip(same, torch._utils._unflatten_dense_tensors(moved.to(flat.device), same)):
            t.copy_(synced)


def sum_grad_over_tp(group: ProcessGroup):
    """A gradient hook: the gradient summed over `group` (a replicated parameter that sees part of the work)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return all_reduce(grad.clone(), group)
    return hook


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensors: list[torch.Tensor], chunk: int = 1 << 22) -> torch.Tensor:
    """Two int64 that change when any bit of `tensors` changes (almost surely), computed on the tensors' device
    in chunks (no full-size temporary): the sum and a position-weighted sum of their bits read as integers.
    For "do the ranks hold the same weights?" without copying every weight to the host."""
    device = tensors[0].device if tensors else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        bits = t.detach().reshape(-1).view(_INT_VIEW[t.element_size()])
        for start in range(0, bits.numel(), chunk):
            part = bits[start:start + chunk].to(torch.int64)
            weights = torch.arange(start + 1, start + part.numel() + 1, device=device) % 1021 + i + 1
            total += torch.stack([part.sum(), (part * weights).sum()])
    return total


def all_equal(tensor: torch.Tensor, group: ProcessGroup) -> bool:
    """Whether every rank of `group` holds the same (small) tensor: one all-gather, on a device the backend
    supports."""
    mine = tensor.to(_backend_device(group, tensor))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])
