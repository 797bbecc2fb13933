"""FSDP2 as the data-parallel axis of a split model: `fully_shard` over the "dp" dim of its ("dp", "tp") mesh.

    model = tp_plugin.parallelize(model, mesh=mesh)        # mesh: ("dp", "tp"), or built from tp_size
    model = tp_plugin.fully_shard(model)                   # FSDP2 over the DP dim: each decoder layer, then the root
    ...                                                    # a plain loop, or Accelerate with an FSDP2 yaml

tp_plugin's shards are plain local tensors, so FSDP2 over the data-parallel ranks of one TP position sees
ordinary tensors: it all-gathers a TP shard from its DP peers and reduce-scatters its gradient among them, and
the TP collectives run inside the forward as before. Three things would go silently wrong without this module:

* FSDP2 over the whole world (its default mesh) would mix the TP ranks' different shards into one flat
  parameter: the mesh given to `fully_shard` is checked to hold one rank of each TP group only.
* FSDP2 replaces every parameter by a new sharded DTensor parameter: the TP tags (`tp_shard`, `tp_replicas`,
  Megatron's `tensor_model_parallel`) that grad norms, saves and adapters read are copied onto the new ones,
  and the gradient hooks some parameters carry (`tp_plugin.runtime.grad_hooks`) are put back on the tensors FSDP2
  computes with.
* A split model wrapped by a plain `torch.distributed.fsdp.fully_shard` call is refused, naming the wrapped module,
  by `checks.check_tagged` (at the first forward and `save_pretrained`; `clip_grad_norm_` refuses untagged DTensor
  gradients), instead of being saved or clipped as if its shards were replicated.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..runtime.grad_hooks import carry_grad_hooks, recorded_hooks
from ..mesh import TPMesh
from ..sharding import TPSplitError
from ..state import tp_state


def data_parallel_mesh(tp_mesh: TPMesh) -> DeviceMesh:
    """The 1-D data-parallel dim of a split model's (dp, tp) mesh: the ranks that hold the same TP shards."""
    return tp_mesh.mesh[tp_mesh.mesh.mesh_dim_names[0]]


def check_data_mesh(mesh: DeviceMesh, tp_mesh: TPMesh, who: str = "fully_shard") -> None:
    """Refuse a data-parallel mesh that holds two ranks of one TP group (no collective)."""
    ranks = set(mesh.mesh.flatten().tolist())
    tp_ranks = set(dist.get_process_group_ranks(tp_mesh.tp_group))
    shared = sorted(ranks & tp_ranks)
    if len(shared) > 1:
        raise TPSplitError(
            f"{who}: its mesh {mesh.mesh_dim_names or ''} spans ranks {sorted(ranks)}, which include ranks {shared} "
            f"of one tensor-parallel group: FSDP would treat their different shards as one parameter and average "
            f"their gradients. Shard over the data-parallel dim only: tp_plugin.fully_shard(model) does, or pass "
            f"mesh=tp_plugin.tp_state(model).mesh.mesh['dp'].")


def _tags(param) -> dict:
    return {k: v for k, v in vars(param).items() if not k.startswith("_")}


@contextlib.contextmanager
def keep_tags(model: nn.Module):
    """Copy every parameter's TP tags onto the parameter that replaces it under the same name, and carry the
    gradient hooks over (around `fully_shard`, Accelerate's FSDP2 preparation, ...)."""
    tags = {name: _tags(p) for name, p in model.named_parameters(remove_duplicate=False)}
    hooks = recorded_hooks(model)
    yield
    tp_state(model).fsdp = True
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in tags and not hasattr(param, "tp_shard"):
            param.__dict__.update(tags[name])
    carry_grad_hooks(hooks)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 wraps one by one: the largest `nn.ModuleList` (by parameters), HF's decoder layers (those
    with parameters: a pipeline stage's list also holds the other stages' `SkippedLayer`s)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return [layer for layer in layers if any(True for _ in layer.parameters())]


def fully_shard(model: nn.Module, *, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True,
                mp_policy=None, offload_policy=None) -> nn.Module:
    """FSDP2 over the data-parallel dim of a split model: each decoder layer, then the root, in place.

    `mesh` (default: the split model's "dp" dim) must hold one rank of each TP group. `mp_policy` and
    `offload_policy` are FSDP2's (`MixedPrecisionPolicy`, `CPUOffloadPolicy`). Clip with
    `tp_plugin.clip_grad_norm_(model, max_norm)`; save with `tp_plugin.save_pretrained(model, dir)`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    state = tp_state(model)
    if state is None or state.mesh is None:
        raise TPSplitError(f"tp_plugin.fully_shard: {type(model).__name__} is not split by tp_plugin.parallelize "
                           f"over several ranks; use torch.distributed.fsdp.fully_shard for an unsplit model")
    mesh = mesh if mesh is not None else data_parallel_mesh(state.mesh)
    check_data_mesh(mesh, state.mesh)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy or MixedPrecisionPolicy(), offload_policy=offload_policy or OffloadPolicy())
    with keep_tags(model):
        for layer in decoder_layers(model):
            torch_fully_shard(layer, **kwargs)
        torch_fully_shard(model, **kwargs)
    return model
