"""The (data-parallel x tensor-parallel) process layout, TP innermost, built on `DeviceMesh`.

TP groups are consecutive ranks so that, with the usual rank-per-GPU numbering, they stay inside one
node where the fast links are. Nothing here is global: the mesh lives on the split model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .runtime.devices import host_name
from .sharding import TPSplitError

logger = logging.getLogger("tp_plugin")


@dataclass
class TPMesh:
    """A split model's process groups: a 2-D `DeviceMesh` (data-parallel dim, "tp"), built here or sliced from
    the caller's mesh (whose other dims, e.g. "pp", are the caller's business)."""

    mesh: DeviceMesh  # dims (dp, "tp"); the dp dim is named "dp" unless the caller named it otherwise

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group(0)

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
        return self.mesh.get_local_rank(0)


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
    return TPMesh(mesh)


def topology_warning(tp_mesh: TPMesh) -> str | None:
    """A warning when the TP group spans hosts, or its GPUs on one host cannot reach each other directly (no
    NVLink / P2P); None when the layout is right. One small object all-gather over the TP group."""
    here = host_name()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else -1
    everyone = [None] * tp_mesh.tp_size
    dist.all_gather_object(everyone, (here, device), group=tp_mesh.tp_group)
    hosts = sorted({h for h, _ in everyone})
    if len(hosts) > 1:
        per_host = {h: sum(1 for x, _ in everyone if x == h) for h in hosts}
        return (f"tp_plugin: the tensor-parallel group of {tp_mesh.tp_size} ranks spans {len(hosts)} hosts "
                f"({per_host}): its 2 all-reduces per block each way cross the network. Keep TP inside a node "
                f"(tp_size <= GPUs per node) and use data parallelism (ZeRO / FSDP) or pipeline stages across "
                f"nodes; `tp-plugin plan` shows the layouts that fit.")
    local = sorted({d for h, d in everyone if h == here and d >= 0})
    unlinked = [(a, b) for a in local for b in local if a < b and not torch.cuda.can_device_access_peer(a, b)]
    if unlinked:
        return (f"tp_plugin: GPUs {unlinked} of the tensor-parallel group cannot access each other directly (no "
                f"NVLink / P2P): TP all-reduces go through host memory. Put the TP group on linked GPUs.")
    return None


def warn_on_topology(tp_mesh: TPMesh) -> None:
    """Log `topology_warning` once per group, on its first rank."""
    message = topology_warning(tp_mesh)
    if message and tp_mesh.tp_rank == 0:
        logger.warning(message)


def _data_dims(mesh: DeviceMesh) -> list[str]:
    names = tuple(mesh.mesh_dim_names or ())
    if "tp" not in names:
        raise TPSplitError(f"parallelize(mesh=...) got a mesh with dims {names or '(unnamed)'}; it needs a dim "
                           f"named 'tp' (the tensor-parallel one), e.g. init_device_mesh('cuda', (dp, tp), "
                           f"mesh_dim_names=('dp', 'tp'))")
    data = [n for n in names if n not in ("tp", "pp")]  # pipeline stages are not data-parallel replicas
    if len(data) > 1:
        raise TPSplitError(f"parallelize(mesh=...): the mesh has several data-parallel dims {data}; flatten them "
                           f"into one first (mesh[{tuple(data)}]._flatten('dp')) and pass mesh[('dp', 'tp')]")
    return data


def tp_size_of(mesh: DeviceMesh, tp_size: int | None) -> int:
    """The TP degree a caller's mesh gives (checked against an explicit `tp_size`); no collective."""
    _data_dims(mesh)
    size = mesh.size(mesh.mesh_dim_names.index("tp"))
    if tp_size is not None and tp_size != size:
        raise TPSplitError(f"parallelize(tp_size={tp_size}, mesh=...) but the mesh's 'tp' dim has {size} ranks; "
                           f"drop tp_size or make them agree")
    return size


def mesh_from(mesh: DeviceMesh) -> TPMesh:
    """The (dp, tp) view of a caller's mesh: ("dp", "tp"), ("pp", "dp", "tp"), ("dp_shard", "tp"), ("tp",)."""
    data = _data_dims(mesh)
    if data:
        return TPMesh(mesh[(data[0], "tp")])
    tp = mesh["tp"] if mesh.ndim > 1 else mesh
    if tp.size() != world_size():
        raise TPSplitError(f"parallelize(mesh=...): the mesh {mesh.mesh_dim_names} has no data-parallel dim and "
                           f"its 'tp' dim ({tp.size()} ranks) is not the whole world ({world_size()}); add a 'dp' dim")
    return build_mesh(tp.size(), mesh.device_type)  # one data-parallel replica
