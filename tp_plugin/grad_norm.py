"""Gradient clipping with the norm of the *unsplit* model.

Every TP rank holds a different slice of each sharded parameter and an identical copy of each replicated
one, so the global norm is: the squares of sharded gradients summed over the TP group, plus the squares of
replicated gradients counted once. Replicated KV heads (`tp_replicas` > 1: the same rows on several TP
ranks, with summed, equal gradients) are sharded *and* repeated, so their squares are divided by the number
of holders. Under DDP / ZeRO the gradients are already reduced over the data-parallel dimension (or the engine
computes the norm itself, see `integrations.deepspeed`); under FSDP2 each data-parallel rank holds a slice of
the rows of each gradient (a DTensor), so those squares are summed over the data-parallel dim as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .sharding import TPSplitError
from .state import tp_state


def _params_and_group(model_or_params, tp_group) -> tuple[list[torch.Tensor], dist.ProcessGroup | None]:
    if isinstance(model_or_params, nn.Module):
        state = tp_state(model_or_params)
        mesh = getattr(state, "mesh", None)
        return list(model_or_params.parameters()), tp_group or (mesh.tp_group if mesh is not None else None)
    params = [model_or_params] if isinstance(model_or_params, torch.Tensor) else list(model_or_params)
    return params, tp_group


def _local(grad: torch.Tensor, replicas):
    """The gradient this rank holds, its per-row replica counts cut to the same rows, and the DTensor's mesh
    (FSDP2: a shard of the rows over the data-parallel dim) or None for a plain tensor."""
    if not isinstance(grad, DTensor):
        return grad, replicas, None
    local = grad.to_local()
    if isinstance(replicas, torch.Tensor):
        _, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
        replicas = replicas[offset[0]:offset[0] + local.shape[0]]
    return local, replicas, grad


def _reduce_over_data_parallel(total: torch.Tensor, dtensor: DTensor, op) -> torch.Tensor:
    """Sum (or max) a DTensor's local contribution over its mesh: shards add up; along a replicated dim only
    coordinate 0 counts."""
    mesh = dtensor.device_mesh
    for dim, placement in enumerate(dtensor.placements):
        if placement.is_replicate() and mesh.get_local_rank(dim) != 0 and op == dist.ReduceOp.SUM:
            total = torch.zeros_like(total)
        dist.all_reduce(total, op=op, group=mesh.get_group(dim))
    return total


def grad_norm(model_or_params: nn.Module | Iterable[torch.Tensor], norm_type: float = 2.0, *,
              tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The `norm_type` norm of all gradients as if the model were unsplit (same value on every TP rank).
    FSDP2's gradients (DTensors sharded over the data-parallel dim) are summed over that dim too."""
    params, group = _params_and_group(model_or_params, tp_group)
    with_grad = [p for p in params if p.grad is not None]
    untagged = [p for p in with_grad if isinstance(p, DTensor) and not hasattr(p, "tp_shard")]
    sharded = any(getattr(p, "tp_shard", None) is not None for p in with_grad)
    if untagged and group is not None:
        raise TPSplitError(f"clip_grad_norm_: {len(untagged)} FSDP2 parameter(s) of shape "
                           f"{tuple(untagged[0].shape)} lost their tensor-parallel tags; shard the split model with "
                           f"tp_plugin.fully_shard(model), not torch's fully_shard")
    if sharded and group is None:
        raise ValueError("clip_grad_norm_ got tensor-parallel shards but no TP group: pass the split model "
                         "itself, or tp_group=tp_plugin.tp_state(model).mesh.tp_group with its parameters")
    tp_size = dist.get_world_size(group) if group is not None else 1
    tp_rank = dist.get_rank(group) if group is not None else 0
    norm_type = float(norm_type)
    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    plain = torch.zeros((), dtype=torch.float32, device=device)
    on_mesh: dict = {}  # FSDP2: (mesh, placements) -> [its DTensor gradients' sum, one DTensor to reduce over]
    for p in with_grad:
        shard = getattr(p, "tp_shard", None) is not None
        if not shard and tp_rank != 0:
            continue  # replicated: TP rank 0 counts it for the whole group
        g, replicas, dtensor = _local(p.grad, getattr(p, "tp_replicas", 1))
        g = g.detach().float()
        if norm_type == math.inf:
            part = g.abs().max() if g.numel() else torch.zeros((), device=device)
        elif isinstance(replicas, torch.Tensor):  # per row (a Mamba-2 in_proj: only its B / C rows are shared)
            per_row = g.abs().pow(norm_type).reshape(g.shape[0], -1).sum(1)
            part = (per_row / replicas.to(per_row)).sum()
        else:
            part = g.abs().pow(norm_type).sum() / replicas
        if dtensor is None:
            plain = torch.maximum(plain, part) if norm_type == math.inf else plain + part
            continue
        key = (dtensor.device_mesh, tuple(dtensor.placements))
        acc = on_mesh.setdefault(key, [torch.zeros((), dtype=torch.float32, device=device), dtensor])
        acc[0] = torch.maximum(acc[0], part) if norm_type == math.inf else acc[0] + part
    total = plain
    for acc, dtensor in on_mesh.values():
        acc = _reduce_over_data_parallel(acc, dtensor, op)
        total = torch.maximum(total, acc) if norm_type == math.inf else total + acc
    if group is not None and tp_size > 1:
        dist.all_reduce(total, op=op, group=group)
    return total if norm_type == math.inf else total.pow(1.0 / norm_type)


def clip_grad_norm_(model_or_params: nn.Module | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    *, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a split model: scale every gradient by the same factor, computed
    from the unsplit model's norm. Returns that (pre-clipping) norm. Call it on every TP rank."""
    params, _ = _params_and_group(model_or_params, tp_group)
    total = grad_norm(model_or_params, norm_type, tp_group=tp_group)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        # the same formula and epsilon as torch.nn.utils.clip_grad_norm_, so unsplit and split runs agree
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:  # (a DTensor gradient is scaled in place through its local shard)
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coef.to(grad.device))
    return total
