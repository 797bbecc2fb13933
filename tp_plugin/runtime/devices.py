"""Which device a rank's collectives run on, and keeping it the device its split model is on.

NCCL takes CUDA tensors only, and torch's object collectives (`all_gather_object`, `broadcast_object_list`: the
split's RNG and topology exchanges, the checks, the saves) put their bytes on the *current* CUDA device, as do
`torch.cuda.get_rng_state()` and the generators dropout draws from. Nothing in torch makes the current device
the model's: under `torchrun` with `model.to(f"cuda:{LOCAL_RANK}")`, or DeepSpeed (which sets it inside
`initialize`, after the split), every rank is on cuda:0 until someone calls `torch.cuda.set_device`. So the
split, the input checks and the saves call `bind_current_device` before their first collective.

Under gloo (CPU runs, and ranks sharing one GPU in `make gpu-check`) nothing here changes anything.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn

from ..sharding import TPSplitError


HOSTNAME_ENV = "TP_PLUGIN_HOSTNAME"  # overrides the host name (to simulate several hosts on one machine)


def host_name() -> str:
    """This rank's host, for telling ranks on one machine from ranks on others."""
    return os.environ.get(HOSTNAME_ENV) or socket.gethostname()


def uses_nccl(group: dist.ProcessGroup | None = None) -> bool:
    """Whether collectives of `group` (default: the world) go through NCCL (CUDA tensors only)."""
    return dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend(group))


def collective_device(group: dist.ProcessGroup | None = None, like: torch.Tensor | None = None) -> torch.device:
    """Where a tensor must live to take part in a collective of `group`: `like`'s own device when the backend
    takes it (NCCL: CUDA; gloo: CPU or CUDA), else the current CUDA device under NCCL, else the CPU."""
    if uses_nccl(group):
        if like is not None and like.device.type == "cuda":
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


def to_collective(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`tensor` on a device the backend of `group` takes (itself when it already is)."""
    return tensor.to(collective_device(group, tensor))


def empty_for_collective(shape, dtype: torch.dtype, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """An uninitialised receive buffer on the device collectives of `group` use."""
    return torch.empty(shape, dtype=dtype, device=collective_device(group))


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first tensor that has memory (None: all on the meta device, or none)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return None


def launcher_device() -> int | None:
    """The CUDA device the launcher gave this rank, as Accelerate and DeepSpeed pick it: the one the default
    process group was bound to (`init_process_group(device_id=...)`), else `LOCAL_RANK` when that many devices
    are visible (one visible device per rank, by CUDA_VISIBLE_DEVICES, gives no choice to make)."""
    bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
    if bound is not None and bound.type == "cuda" and bound.index is not None:
        return bound.index
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and int(local) < torch.cuda.device_count():
        return int(local)
    return None


def mesh_device_type(model: nn.Module) -> str:
    """The device type of a split model's mesh: "cuda" under NCCL whatever device the model is on now (a model
    split on the CPU and moved later still has its collectives, and FSDP2 its shards, on the GPU), else the
    model's parameters' device type (the CPU for a model on the meta device)."""
    if uses_nccl():
        return "cuda"
    device = model_device(model)
    return device.type if device is not None else "cpu"


def bind_current_device(model: nn.Module, where: str) -> None:
    """Under NCCL, make the current CUDA device the one this rank's model is on, or, for a model on the CPU or
    the meta device, the launcher's (`launcher_device`); refuse a disagreement that is not ours to resolve.

    The current device is changed only while it is still cuda:0 (torch's default, which nobody may have chosen);
    a different current device was set on purpose, and a model elsewhere is then an error, on this rank, before
    any collective (every rank of a launch runs the same code, so its peers fail at the same line)."""
    if not uses_nccl() or not torch.cuda.is_available():
        return
    device = model_device(model)
    on_gpu = device is not None and device.type == "cuda"
    wanted = device.index if on_gpu else launcher_device()
    current = torch.cuda.current_device()
    if wanted is None or wanted == current:
        return
    if current != 0:
        held = f"the model is on cuda:{wanted}" if on_gpu else f"the launcher gave this rank cuda:{wanted}"
        raise TPSplitError(
            f"tp_plugin ({where}): rank {dist.get_rank()}'s current CUDA device is cuda:{current} but {held}. NCCL "
            f"and tp_plugin's own collectives use the current device, and dropout draws from its generator, so "
            f"the two must agree. Fix: torch.cuda.set_device({wanted}) before building the model, or "
            f"model.to('cuda:{current}')")
    torch.cuda.set_device(wanted)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device_type` right now, or None where it is off (or where the
    device has no autocast: meta, which the planner measures on)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


RETURN_MEMORY_ABOVE = 32 << 20  # bytes of shards kept: below this a split frees too little to be worth asking


def return_freed_memory(model: nn.Module) -> None:
    """Give the memory of what a split just dropped (the whole weights of every split layer) back to the system:
    on the CPU glibc keeps freed heap memory in the process until asked (`malloc_trim`); on CUDA torch's caching
    allocator keeps it for torch until `empty_cache`."""
    import gc

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":  # nothing was allocated (the planner's models, loading before materialising)
        return
    if sum(p.numel() * p.element_size() for p in params) < RETURN_MEMORY_ABOVE:
        return  # a small model: not worth a garbage collection (about 0.1 s with transformers loaded)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to ask
            pass
