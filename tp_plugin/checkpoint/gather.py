"""What a save walks over: the model behind any wrapper, its distinct tensors with every rank's shard specs,
and the gather of one full tensor onto TP rank 0.

Wrappers: a DeepSpeed engine (or DDP) holds the model as `.module`. Under ZeRO-3 a parameter is partitioned
over the data-parallel group (it has a `ds_id`) and is first gathered with `deepspeed.zero.GatheredParameters`
(a collective of that group, so every rank takes part); under FSDP2 it is a DTensor sharded over that group and
is gathered the same way (`full_tensor`); under ZeRO-1/2 the module's parameters are whole.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..runtime.devices import to_collective
from ..mesh import TPMesh
from ..sharding import ShardSpec, unshard_tensor
from ..state import tp_state


def unwrap(model_or_engine) -> nn.Module:
    """The transformers model inside a DeepSpeed engine / DDP / Accelerate wrapper."""
    from transformers import PreTrainedModel

    model = model_or_engine
    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # (a DeepSpeed engine has a `.config` too: its own dict)
    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise TypeError(f"{type(model_or_engine).__name__} is not a transformers model (no `.config`), nor a "
                        f"wrapper (DeepSpeed engine, DDP) holding one as `.module`")
    return model


@dataclass
class Entry:
    """One tensor of the checkpoint: its name, the local tensor, its full shape, and every TP rank's spec
    (`specs=None`: replicated, rank 0's copy is the tensor; `[]`: sharded but not in the plan, see below)."""

    name: str
    tensor: torch.Tensor
    shape: tuple[int, ...]
    specs: list[ShardSpec] | None

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype


def _local_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3: the shape before DP partitioning


def tensor_entries(model: nn.Module) -> list[Entry]:
    """The state dict's distinct tensors in order (a tied weight once, under its first name, as HF saves it)."""
    state = tp_state(model)
    plan_specs: dict[str, tuple[list, tuple]] = {}
    if state is not None and state.mesh is not None and state.plan.tp_size > 1:
        for e in state.plan.entries:
            for pname, full in e.full_shapes.items():
                plan_specs[f"{e.path}.{pname}"] = ([e.specs[r][pname] for r in range(state.plan.tp_size)], full)
    entries, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        spec = getattr(tensor, "tp_shard", None)
        if spec is None:
            entries.append(Entry(name, tensor, _local_shape(tensor), None))
        elif name in plan_specs and plan_specs[name][0][0] is not None:
            entries.append(Entry(name, tensor, tuple(plan_specs[name][1]), plan_specs[name][0]))
        else:  # sharded, but named differently from the plan (a wrapper renamed it): specs gathered at save time
            shape = list(_local_shape(tensor))
            shape[spec.dim] = spec.full_size
            entries.append(Entry(name, tensor, tuple(shape), []))
    return entries


@contextlib.contextmanager
def gathered(tensor: torch.Tensor):
    """This rank's whole TP shard for the block, on every rank of its data-parallel group (a collective of that
    group, so every rank takes part): under ZeRO-3 the partitioned parameter (`deepspeed.zero.GatheredParameters`),
    under FSDP2 the DTensor's rows from its data-parallel peers; otherwise the tensor itself."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            yield tensor.detach()
    elif isinstance(tensor, DTensor):
        yield tensor.detach().full_tensor()
    else:
        yield tensor.detach()


def specs_of(entry: Entry, mesh: TPMesh) -> list[ShardSpec]:
    if entry.specs == []:  # not in the plan: ask every TP rank for its spec (a small collective)
        specs = [None] * mesh.tp_size
        dist.all_gather_object(specs, entry.tensor.tp_shard, group=mesh.tp_group)
        entry.specs = specs
    return entry.specs


def gather_full(entry: Entry, local: torch.Tensor, mesh: TPMesh | None) -> torch.Tensor | None:
    """The full tensor on TP rank 0 (None on the others), from this rank's shard `local` (what
    `gathered(entry.tensor)` gives).

    Shards of uneven size are padded to the largest before `dist.gather` and cut back with the specs, which
    every rank knows from the plan. Peak on TP rank 0: the gathered shards plus the full tensor.
    """
    if entry.specs is None or mesh is None or mesh.tp_size == 1:
        return local if mesh is None or mesh.tp_rank == 0 else None
    specs = specs_of(entry, mesh)
    dim, longest = specs[0].dim, max(s.local_size for s in specs)
    if local.shape[dim] < longest:
        pad = list(local.shape)
        pad[dim] = longest - local.shape[dim]
        local = torch.cat([local, local.new_zeros(pad)], dim=dim)
    local = to_collective(local.contiguous(), mesh.tp_group)  # NCCL: a model still on the CPU gathers on its GPU
    bucket = [torch.empty_like(local) for _ in specs] if mesh.tp_rank == 0 else None
    dist.gather(local, bucket, group=mesh.tp_group, group_dst=0)
    if mesh.tp_rank != 0:
        return None
    return unshard_tensor([g.narrow(dim, 0, s.local_size) for g, s in zip(bucket, specs)], specs)
