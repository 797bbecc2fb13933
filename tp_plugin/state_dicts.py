"""What `state_dict()` and `load_state_dict()` mean on a split model: this rank's shards, and only this rank's.

Every rank's shards have the same keys, and usually the same shapes, so the DDP habit (rank 0 saves
`model.state_dict()`, every rank loads it) would "match all keys" and silently give every rank rank 0's slices.
The split model therefore marks its state dict and checks what it loads (`install`, on the split model):

* `state_dict()` records, in the state dict's own metadata (`state_dict._metadata`, which `torch.save` keeps),
  which TP rank of which degree it was taken on.
* `load_state_dict(sd)`: a state dict marked with another TP rank or degree is refused, on that rank, before
  anything is copied, naming the routes that work. A full (unsplit) tensor where the model holds a shard, in an
  unmarked state dict (the unsplit model's `state_dict()`, a hand-made dict), is cut to this rank's slice on the
  fly, so `split.load_state_dict(unsplit.state_dict())` loads the unsplit weights. Unmarked tensors of the
  shard's shape are taken as this rank's (a dict comprehension drops the metadata; DCP loads them so).
  `load_state_dict(assign=True)` replaces the parameters: the new ones get the old ones' TP tags and gradient hooks.

The ordinary roundtrip, each rank loading its own `state_dict()`, keeps working unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .runtime.copies import named_tensors
from .mesh import TPMesh
from .sharding import TPSplitError, shard_tensor

KEY = "tp_plugin"  # in the top module's metadata: {"tp_rank": r, "tp_size": t}


class _MarkRank:
    """State-dict post-hook: record this rank in the metadata (a callable object: copied with the model)."""

    def __init__(self, mesh: TPMesh):
        self.mesh = mesh

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        local_metadata[KEY] = {"tp_rank": self.mesh.tp_rank, "tp_size": self.mesh.tp_size}


class _LoadHooks:
    """`before`, a load-state-dict pre-hook: refuse another rank's shards, slice full tensors (see the module
    docstring), and note every tensor's tags; `after`, a post-hook: a tensor that the load replaced
    (`load_state_dict(assign=True)`, PEFT's low_cpu_mem_usage path) gets the tags and gradient hooks back."""

    def __init__(self, mesh: TPMesh):
        self.mesh = mesh
        self.tagged: dict[str, torch.Tensor] = {}

    def after(self, module, incompatible_keys) -> None:
        tagged, self.tagged = self.tagged, {}
        current = dict(named_tensors(module))
        sequence = getattr(getattr(module, "tp_plugin_state", None), "sequence", None)
        for name, old in tagged.items():
            new = current.get(name)
            if new is None or new is old or vars(new):
                continue
            vars(new).update(vars(old))
            for hook in getattr(old, "tp_grad_hooks", ()):
                new.register_hook(hook)
            if sequence is not None:
                sequence.adopt(old, new)

    def before(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        self.tagged = {name: t for name, t in named_tensors(module) if vars(t)}
        mine = {"tp_rank": self.mesh.tp_rank, "tp_size": self.mesh.tp_size}
        theirs = local_metadata.get(KEY)
        if theirs is not None and theirs != mine:
            raise TPSplitError(
                f"load_state_dict on TP rank {mine['tp_rank']} of {mine['tp_size']} (global rank {dist.get_rank()}) "
                f"got the state dict of TP rank {theirs['tp_rank']} of {theirs['tp_size']}: a split model's "
                f"state_dict() holds only that rank's shards, so loading it here would give this rank another "
                f"rank's slices. Load each rank's own state_dict(), or save and load through tp_plugin: "
                f"tp_plugin.save_pretrained(model, dir) + tp_plugin.from_pretrained(dir, tp_size=...) (an ordinary "
                f"unsplit checkpoint, any degree), or tp_plugin.save_sharded (per-rank shards); a full unsplit "
                f"state dict (the unsplit model's state_dict()) also loads, sliced on the fly")
        if theirs is not None:
            return
        for name, tensor in _sharded_tensors(module):
            key = prefix + name
            value = state_dict.get(key)
            spec = tensor.tp_shard
            if value is None or value.dim() != tensor.dim() or value.shape == tensor.shape:
                continue
            full = list(tensor.shape)
            full[spec.dim] = spec.full_size
            if list(value.shape) == full:
                state_dict[key] = shard_tensor(value, spec)  # a full tensor: this rank's slice of it


def _sharded_tensors(model: nn.Module):
    for name, tensor in named_tensors(model):
        if getattr(tensor, "tp_shard", None) is not None:
            yield name, tensor


def install(model: nn.Module, mesh: TPMesh) -> None:
    hooks = _LoadHooks(mesh)
    model.register_state_dict_post_hook(_MarkRank(mesh))
    model.register_load_state_dict_pre_hook(hooks.before)
    model.register_load_state_dict_post_hook(hooks.after)
