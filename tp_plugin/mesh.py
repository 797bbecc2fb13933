"""The (data-parallel x tensor-parallel) process layout, TP innermost, built on `DeviceMesh`.

TP groups are consecutive ranks so that, with the usual rank-per-GPU numbering, they stay inside one
node where the fast links are. Nothing here is global: the mesh lives on the split model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .sharding import TPSplitError

logger = logging.getLogger("tp_plugin")


@dataclass
class TPMesh:
    mesh: DeviceMesh  # dims ("dp", "tp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def tp_size(self) -> int:
        return self.mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_layout(tp_size: int) -> None:
    """Raise (identically on every rank, before any collective) when tp_size cannot form a layout."""
    world = world_size()
    if tp_size < 1:
        raise TPSplitError(f"tp_size must be >= 1 (got {tp_size})")
    if tp_size > 1 and world == 1:
        raise TPSplitError(f"tp_size={tp_size} needs {tp_size} processes, but torch.distributed is not initialised "
                           f"(world size 1). Launch with `torchrun --nproc_per_node {tp_size}` (or accelerate/"
                           f"deepspeed) and call torch.distributed.init_process_group() first.")
    if world % tp_size:
        raise TPSplitError(f"tp_size={tp_size} does not divide the world size {world}: the ranks form "
                           f"(world / tp) data-parallel groups of tp consecutive ranks. Use a tp_size among "
                           f"{[d for d in range(1, world + 1) if world % d == 0]}.")


def build_mesh(tp_size: int, device_type: str) -> TPMesh:
    """A 2-D mesh: `world / tp_size` data-parallel replicas of `tp_size` consecutive ranks."""
    world = world_size()
    mesh = init_device_mesh(device_type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if tp_size > local and dist.get_rank() == 0:
        logger.warning("tensor-parallel groups of %d ranks span nodes of %d ranks: TP traffic will cross the "
                       "network; prefer tp_size <= ranks per node", tp_size, local)
    return TPMesh(mesh)
