"""Gradient clipping with the norm of the *unsplit* model.

Every TP rank holds a different slice of each sharded parameter and an identical copy of each replicated
one, so the global norm is: the squares of sharded gradients summed over the TP group, plus the squares of
replicated gradients counted once. Replicated KV heads (`tp_replicas` > 1: the same rows on several TP
ranks, with summed, equal gradients) are sharded *and* repeated, so their squares are divided by the number
of holders. The data-parallel dimension is not touched: under DDP / ZeRO the gradients are already reduced
over it (or the engine computes the norm itself, see `integrations.deepspeed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .state import tp_state


def _params_and_group(model_or_params, tp_group) -> tuple[list[torch.Tensor], dist.ProcessGroup | None]:
    if isinstance(model_or_params, nn.Module):
        state = tp_state(model_or_params)
        mesh = getattr(state, "mesh", None)
        return list(model_or_params.parameters()), tp_group or (mesh.tp_group if mesh is not None else None)
    params = [model_or_params] if isinstance(model_or_params, torch.Tensor) else list(model_or_params)
    return params, tp_group


def grad_norm(model_or_params: nn.Module | Iterable[torch.Tensor], norm_type: float = 2.0, *,
              tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The `norm_type` norm of all gradients as if the model were unsplit (same value on every TP rank)."""
    params, group = _params_and_group(model_or_params, tp_group)
    with_grad = [p for p in params if p.grad is not None]
    sharded = any(getattr(p, "tp_shard", None) is not None for p in with_grad)
    if sharded and group is None:
        raise ValueError("clip_grad_norm_ got tensor-parallel shards but no TP group: pass the split model "
                         "itself, or tp_group=tp_plugin.tp_state(model).mesh.tp_group with its parameters")
    tp_size = dist.get_world_size(group) if group is not None else 1
    tp_rank = dist.get_rank(group) if group is not None else 0
    norm_type = float(norm_type)
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in with_grad:
        shard = getattr(p, "tp_shard", None) is not None
        if not shard and tp_rank != 0:
            continue  # replicated: TP rank 0 counts it for the whole group
        g = p.grad.detach().float()
        if norm_type == math.inf:
            total = torch.maximum(total, g.abs().max())
        else:
            replicas = getattr(p, "tp_replicas", 1)
            if isinstance(replicas, torch.Tensor):  # per row (a Mamba-2 in_proj: only its B / C rows are shared)
                per_row = g.abs().pow(norm_type).reshape(g.shape[0], -1).sum(1)
                total = total + (per_row / replicas.to(per_row)).sum()
            else:
                total = total + g.abs().pow(norm_type).sum() / replicas
    if group is not None and tp_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM, group=group)
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
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
