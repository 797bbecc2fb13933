"""The few places where PEFT is taught about split models. Each wrapper does nothing for an unsplit model.

* `BaseTuner.inject_adapter` (every way an adapter gets added: get_peft_model, PeftModel.from_pretrained,
  add_adapter, inject_adapter_in_model): on a split model, refuse what cannot be split (`checks.py`) before any
  collective, register the TP LoRA layers on the config (`LoraConfig._register_custom_module`) and resolve
  "all-linear" to include the parallel linears.
* `IA3Model._create_new_module`: IA3 has no custom-module hook; the TP IA3 layers are dispatched first (only a
  parallel linear matches them, so unsplit models never see them).
* `PeftModel.__init__`: refuse prompt-learning methods (they never reach inject_adapter).
* `TrainableTokensWrapper.init_modules`: `trainable_token_indices` on a vocabulary-split embedding (and the LM head
  tied to it) gets the TP token adapter (`trainable_tokens.py`).
* `save_and_load.has_valid_embedding_base_layer`: a LoRA embedding's base weight is saved with the adapter (as
  PEFT saves it for an `nn.Embedding` base), also for a `VocabParallelEmbedding` base (gathered like the rest).
* `get_peft_model_state_dict`: gather each TP-sharded tensor of the adapter to its full, ordinary shape.
* `PeftModel.save_pretrained`: only global rank 0 writes, into a temp dir whose files are renamed into place.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile

import torch.distributed as dist
from peft import PeftModel
from peft.tuners.ia3 import IA3Model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import TrainableTokensWrapper
from torch import nn

from ...runtime.arrival import arrive_together
from ...runtime.layers import VocabParallelEmbedding
from ...sharding import unshard_tensor
from ...state import split_state
from .. import patching
from .checks import check_method, prepare
from .ia3 import create_ia3_module
from .trainable_tokens import make_token_adapter

_STATE_DICT_MODULES = ("peft", "peft.utils", "peft.utils.save_and_load", "peft.peft_model")


def _wrap_inject_adapter(original):
    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if split_state(model) is not None:
            prepare(model, self.peft_config[adapter_name])
        return original(self, model, adapter_name, *args, **kwargs)
    return inject_adapter


def _wrap_ia3_create_new_module(original):
    @functools.wraps(original)
    def _create_new_module(ia3_config, adapter_name, target, **kwargs):
        module = create_ia3_module(target, adapter_name, ia3_config, is_feedforward=kwargs.get("is_feedforward", False))
        return module if module is not None else original(ia3_config, adapter_name, target, **kwargs)
    return staticmethod(_create_new_module)


def _wrap_init_modules(original):
    @functools.wraps(original)
    def init_modules(self, adapter_name, token_indices, tied_adapter):
        layer = make_token_adapter(self.original_module, adapter_name, token_indices, tied_adapter)
        if layer is None:
            return original(self, adapter_name, token_indices, tied_adapter)
        self.token_adapter = layer
    return init_modules


def _wrap_has_valid_embedding_base_layer(original):
    @functools.wraps(original)
    def has_valid_embedding_base_layer(layer):
        return original(layer) or isinstance(getattr(layer, "base_layer", None), VocabParallelEmbedding)
    return has_valid_embedding_base_layer


def _wrap_peft_model_init(original):
    @functools.wraps(original)
    def __init__(self, model, peft_config, *args, **kwargs):
        if split_state(model) is not None:
            check_method(model, peft_config)
        original(self, model, peft_config, *args, **kwargs)
    return __init__


def gather_adapter_state(model: nn.Module, local: dict, selected: dict) -> dict:
    """`selected` (PEFT's adapter state dict, values taken from `local`) with every TP shard made full.

    A value's origin is found by identity in `local`, whose keys are the model's parameter names, so the shard
    spec comes from the parameter's `tp_shard` tag. One object all-gather over the TP group for the whole adapter.
    """
    state = split_state(model)
    specs = {name: p.tp_shard for name, p in model.named_parameters() if getattr(p, "tp_shard", None) is not None}
    origin = {id(v): k for k, v in local.items()}
    sharded = {k: (v.detach().cpu(), specs[origin[id(v)]]) for k, v in selected.items()
               if origin.get(id(v)) in specs}
    group = state.mesh.tp_group
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, sharded, group=group)
    out = dict(selected)
    for key, (value, _) in sharded.items():
        full = unshard_tensor([r[key][0] for r in everyone], [r[key][1] for r in everyone])
        out[key] = full.to(selected[key].device)
    return out


def _local_state_dict(model: nn.Module) -> dict:
    """model.state_dict(), with the trainable (adapter) tensors that ZeRO-3 or FSDP2 shard over the data-parallel
    group gathered back to this TP rank's shard first (copies; a collective of that group, in state-dict order)."""
    from torch.distributed.tensor import DTensor

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    partitioned = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not partitioned:
        return {k: v.full_tensor() if isinstance(v, DTensor) and k in trainable else v
                for k, v in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return {k: v.clone() for k, v in model.state_dict().items()}


def _wrap_get_state_dict(original):
    if getattr(original, "_tp_plugin", False):
        return original

    @functools.wraps(original)
    def get_peft_model_state_dict(model, state_dict=None, adapter_name="default", *args, **kwargs):
        if split_state(model) is None:
            return original(model, state_dict, adapter_name, *args, **kwargs)
        local = _local_state_dict(model) if state_dict is None else state_dict
        selected = original(model, local, adapter_name, *args, **kwargs)
        return gather_adapter_state(model, local, selected)
    get_peft_model_state_dict._tp_plugin = True
    return get_peft_model_state_dict


def _wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        if split_state(self) is None:
            return original(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        # Every rank must call this (the shards are gathered); one writes the ordinary, unsplit adapter.
        arrive_together("PeftModel.save_pretrained", "call model.save_pretrained(dir) on every rank, not only on "
                                                     "rank 0: the others send their adapter shards, rank 0 writes")
        writer = is_main_process and dist.get_rank() == 0
        if not writer:
            original(self, save_directory, *args, is_main_process=False, **kwargs)
        else:
            save_directory = os.fspath(save_directory)
            parent = os.path.dirname(os.path.abspath(save_directory))
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tp_plugin-adapter-", dir=parent)
            try:
                original(self, tmp, *args, is_main_process=True, **kwargs)
                _move_tree(tmp, save_directory)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()  # nobody returns (and e.g. reloads) before the files are in place
    return save_pretrained


def _move_tree(src: str, dst: str) -> None:
    """Rename every file of `src` into `dst` (same filesystem: each file appears complete or not at all)."""
    for root, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(root, name), os.path.join(target, name))


_REPLACED: list[tuple[object, str]] = []  # (owner, attribute) replaced here, in installation order


def _replace(owner, name: str, wrapper) -> None:
    if patching.wrap(owner, name, wrapper):
        _REPLACED.append((owner, name))


def install() -> None:
    """Teach PEFT about split models (idempotent; `uninstall()` undoes it)."""
    _replace(BaseTuner, "inject_adapter", _wrap_inject_adapter)
    _replace(IA3Model, "_create_new_module", _wrap_ia3_create_new_module)
    _replace(TrainableTokensWrapper, "init_modules", _wrap_init_modules)
    _replace(PeftModel, "__init__", _wrap_peft_model_init)
    _replace(PeftModel, "save_pretrained", _wrap_save_pretrained)
    save_and_load = sys.modules["peft.utils.save_and_load"]
    _replace(save_and_load, "has_valid_embedding_base_layer", _wrap_has_valid_embedding_base_layer)
    for module_name in _STATE_DICT_MODULES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "get_peft_model_state_dict"):
            _replace(module, "get_peft_model_state_dict", _wrap_get_state_dict)


def uninstall() -> None:
    """Put PEFT's own functions back (adapter layers already built on a split model keep working)."""
    while _REPLACED:
        patching.restore(*_REPLACED.pop())
