"""The autograd collectives of tensor parallelism, each paired with its dual in backward (Megatron's f and g).

Every op is the identity when the group has a single rank, so a tp=1 model pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..sharding import ShardSpec, unshard_tensor
from .devices import collective_device, to_collective


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
        return all_gather_along(x, -1, group)

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


def all_gather_stacked(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """A plain (non-autograd) all-gather into one new tensor `[world, *x.shape]` (rank order).

    Into one flat buffer, not a list of tensors: NCCL's list form gathers into a flat buffer of its own and
    copies it out to the list, and concatenating the list copies it again."""
    # (detached: gloo copies into views of the output on its own thread, which autograd refuses for an input
    # that requires grad; no gradient flows through a plain collective anyway)
    world, flat = dist.get_world_size(group), x.detach().contiguous().reshape(-1)
    out = flat.new_empty(world * flat.numel())
    _one_buffer("all_gather")(out, flat, group=group)
    return out.view(world, *x.shape)


def _one_buffer(kind: str):
    """torch's one-buffer all-gather / reduce-scatter: `*_single` since torch 2.13, which deprecates the older
    names (looked up at each call, so that a collective counter's wrappers see it)."""
    new, old = {"all_gather": ("all_gather_single", "all_gather_into_tensor"),
                "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor")}[kind]
    return getattr(dist, new, None) or getattr(dist, old)


def gather_whole(tensor: torch.Tensor, spec: ShardSpec, group: ProcessGroup) -> torch.Tensor:
    """The whole tensor on every rank of `group`, from each rank's shard of it (`spec`: this rank's `ShardSpec`,
    the ranks' specs exchanged first; shards of uneven size are padded to the longest for the one all-gather).
    Saving gathers to one rank instead (`checkpoint.gather.gather_full`), which never holds the whole on the
    others."""
    specs = [None] * dist.get_world_size(group)
    dist.all_gather_object(specs, spec, group=group)
    longest = max(s.local_size for s in specs)
    if tensor.shape[spec.dim] < longest:
        pad = list(tensor.shape)
        pad[spec.dim] = longest - tensor.shape[spec.dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=spec.dim)
    return unshard_tensor(list(all_gather_stacked(tensor, group).unbind(0)), specs)


def all_gather_along(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """A plain (non-autograd) all-gather of equal chunks, concatenated along `dim`: the gathered buffer itself
    along dim 0, one copy (the concatenation's) along any other."""
    world, dim = dist.get_world_size(group), dim % x.ndim
    stacked = all_gather_stacked(x, group)
    if dim == 0:
        return stacked.view(world * x.shape[0], *x.shape[1:])
    shape = (*x.shape[:dim], world * x.shape[dim], *x.shape[dim + 1:])
    return stacked.movedim(0, dim).reshape(shape)


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
    # One buffer in, one out (split along dim 0): no copy at all along dim 0, else one of the
    # input and one of this rank's chunk, where the list form costs a copy per chunk and NCCL's own flattening.
    moved = x.detach().movedim(dim, 0).contiguous()
    out = moved.new_empty((size, *moved.shape[1:]))
    return Pending(_one_buffer("reduce_scatter")(out, moved, group=group, async_op=True),
                   lambda: out.movedim(0, dim).contiguous())


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

BROADCAST_BUCKET_BYTES = 64 << 20  # the most `broadcast_from_rank0` copies at once


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """`tensors` in order, grouped by dtype into runs of at most `limit` bytes (a larger tensor alone)."""
    buckets, sizes = {}, {}
    out = []
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        bucket = buckets.get(t.dtype)
        if bucket is None or sizes[t.dtype] + nbytes > limit:
            bucket = buckets[t.dtype] = []
            sizes[t.dtype] = 0
            out.append(bucket)
        bucket.append(t)
        sizes[t.dtype] += nbytes
    return out


def broadcast_from_rank0(tensors: list[torch.Tensor], group: ProcessGroup) -> None:
    """Overwrite `tensors` (in place) with rank 0 of `group`'s, on a device the backend takes. Small tensors go
    in flat buckets of at most `BROADCAST_BUCKET_BYTES` (one collective each), a large one in place when the
    backend takes it where it is, so the extra memory is one bucket, never a copy of the whole model."""
    for bucket in _buckets(tensors, BROADCAST_BUCKET_BYTES):
        alone = bucket[0] if len(bucket) == 1 and bucket[0].is_contiguous() else None
        if alone is not None and collective_device(group, alone) == alone.device:
            dist.broadcast(alone, group=group, group_src=0)
            continue
        flat = torch._utils._flatten_dense_tensors(bucket) if alone is None else alone
        moved = to_collective(flat, group)
        dist.broadcast(moved, group=group, group_src=0)
        for t, synced in zip(bucket, torch._utils._unflatten_dense_tensors(moved, bucket)):
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
    everyone = all_gather_stacked(to_collective(tensor, group), group)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])
