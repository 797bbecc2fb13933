"""`tp_plugin.save_pretrained(pipe, dir)`: one ordinary HF checkpoint from every pipeline stage.

Stages keep the checkpoint's parameter names (`stages.py`), so the checkpoint is the union of the stages' state
dicts: each tensor is written once, by global rank 0, from the first stage that holds it (a tied embedding from
the first stage). Every rank walks the same list in the same order: the holding stage's data-parallel replica 0
gathers the tensor over its TP group (`gather_full`), and its TP rank 0 sends it to rank 0 if it is not rank 0.
No shared file system is needed, and rank 0 holds one tensor at a time.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..runtime import devices
from ..checkpoint.gather import gather_full, gathered, tensor_entries
from ..state import mesh_of
from ..checkpoint.write import check_target, is_writer, write_hf_checkpoint


def save_pipeline(pipe, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    mesh = pipe.mesh
    devices.bind_current_device(pipe.stages[0].model, "save_pretrained")  # NCCL: the sends run on this rank's GPU
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    target = check_target(save_directory)
    local = {}  # name -> (entry, the stage's TP mesh), first stage first
    for index, stage in sorted(zip(pipe.stage_indices, pipe.stages), key=lambda x: x[0]):
        for entry in tensor_entries(stage.model):
            local.setdefault(entry.name, (entry, mesh_of(stage.model), index))
    mine = [(name, str(e.dtype).removeprefix("torch."), tuple(e.shape), index) for name, (e, _, index) in local.items()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    owner: dict[str, tuple] = {}
    for listing in everyone:
        for name, dtype, shape, index in listing:
            if name not in owner or index < owner[name][2]:
                owner[name] = (getattr(torch, dtype), shape, index)
    order = sorted(owner, key=lambda n: owner[n][2])  # stage by stage; each stage's own order (sort is stable)
    writer = is_writer()

    def fetch(name: str):
        dtype, shape, index = owner[name]
        holder_pp = index % mesh.size(0)
        source = int(mesh.mesh[holder_pp, 0, 0])
        if pp_rank != holder_pp:
            if writer:  # (rank 0 is on stage 0's replica 0: only other stages' tensors arrive here)
                full = devices.empty_for_collective(shape, dtype)  # NCCL: on this rank's GPU (the writer copies it out)
                dist.recv(full, src=source)
                return full
            return None
        entry, tp_mesh, _ = local[name]
        with gathered(entry.tensor) as shard:  # (FSDP2: a collective of the stage's data-parallel ranks)
            full = gather_full(entry, shard, tp_mesh) if dp_rank == 0 else None
        if full is not None and source != 0:
            dist.send(devices.to_collective(full.contiguous()), dst=0)
            return None
        return full

    write_hf_checkpoint(target, pipe.stages[0].model, [(n, owner[n][0], owner[n][1]) for n in order], fetch,
                        max_shard_size, writer=writer)
