"""The few places where PEFT is taught about split models. Each wrapper does nothing for an unsplit model.

* `BaseTuner.inject_adapter` (every way an adapter gets added: get_peft_model, PeftModel.from_pretrained,
  add_adapter, inject_adapter_in_model): on a split model, refuse what cannot be split (a non-LoRA method, a
  LoRA variant, a vocabulary-parallel target) before any collective, register the TP LoRA layers on the
  config (`LoraConfig._register_custom_module`) and resolve "all-linear" to include the parallel linears.
* `PeftModel.__init__`: refuse prompt-learning methods (they never reach inject_adapter).
* `get_peft_model_state_dict`: gather each TP-sharded tensor of the adapter to its full, ordinary shape.
* `PeftModel.save_pretrained`: only global rank 0 writes, into a temp dir whose files are renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import tempfile

import torch.distributed as dist
from peft import PeftModel, PeftType
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from ...checks import arrive_together
from ...layers import PARALLEL_LAYERS, ColumnParallelLinear, RowParallelLinear
from ...sharding import TPSplitError, unshard_tensor
from ...state import tp_state as tp_state_of
from .layers import LORA_LAYERS

_SUPPORTED_INITS = (True, False, "gaussian")
_STATE_DICT_MODULES = ("peft", "peft.utils", "peft.utils.save_and_load", "peft.peft_model")


def tp_state(model: nn.Module):
    """The TPState of a split model (also through PeftModel/LoraModel, which forward attributes), else None."""
    state = tp_state_of(model)
    mesh = getattr(state, "mesh", None)
    return state if mesh is not None and mesh.tp_size > 1 else None


def _unsupported(what: str, fix: str) -> TPSplitError:
    return TPSplitError(f"unsupported on a tensor-parallel model (tp_plugin): {what}. {fix}")


def check_method(model: nn.Module, config) -> None:
    """Only LoRA has TP-aware layers; anything else would train with wrong gradients or fail obscurely."""
    peft_type = getattr(config, "peft_type", None)
    if peft_type != PeftType.LORA:
        name = getattr(peft_type, "value", peft_type)
        split = [n for n, m in model.named_modules() if isinstance(m, PARALLEL_LAYERS)]
        has_targets = bool(getattr(config, "target_modules", None))
        targeted = [n for n in split if has_targets and check_target_module_exists(config, n)]
        where = f"the split layers {targeted}" if targeted else f"a split model ({len(split)} split layers)"
        raise _unsupported(f"PEFT method {name} ({type(config).__name__}) on {where}",
                           "tp_plugin supports LoRA (peft.LoraConfig) on split models; use LoRA, or apply "
                           f"{name} to the unsplit model without tp_plugin.parallelize")


def _check_lora_options(config) -> None:
    variants = [f.name for f in dataclasses.fields(config)
                if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
    if variants:
        raise _unsupported(f"LoRA variant option(s) {variants} (e.g. DoRA)",
                           "plain LoRA (with lora_alpha, use_rslora, lora_dropout, lora_bias) is supported; "
                           "unset those options")
    if config.init_lora_weights not in _SUPPORTED_INITS:
        raise _unsupported(f"init_lora_weights={config.init_lora_weights!r} (it needs the full base weight "
                           f"or data)", f"use one of {list(_SUPPORTED_INITS)}")
    for option in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if getattr(config, option, None):
            raise _unsupported(f"LoraConfig.{option}={getattr(config, option)!r}", f"leave {option} unset")


def _check_targets(model: nn.Module, config) -> None:
    """Every module the config targets (or keeps trainable) must be one we can adapt split."""
    saved = list(config.modules_to_save or [])
    for name, module in model.named_modules():
        if not name or not isinstance(module, PARALLEL_LAYERS):
            continue
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        if check_target_module_exists(config, name):
            raise _unsupported(f"LoRA on {name} ({type(module).__name__}, split by vocabulary)",
                               "target the attention/MLP projections (q_proj, v_proj, ..., or 'all-linear'); "
                               "remove this module from target_modules")
        if any(name == s or name.endswith("." + s) for s in saved):
            raise _unsupported(f"modules_to_save containing {name} ({type(module).__name__}, a split layer)",
                               "remove it from modules_to_save")


def _resolve_all_linear(model: nn.Module, config) -> None:
    """PEFT's 'all-linear' picks nn.Linear/Conv1D by type; add the parallel linears (the LM head is a
    VocabParallelLMHead, so it stays excluded as PEFT excludes it)."""
    if not (isinstance(config.target_modules, str)
            and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    _maybe_include_all_linear_layers(config, model)  # nn.Linear/Conv1D left in the model, minus the heads
    config.target_modules = set(config.target_modules) | {
        name for name, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}


def prepare(model: nn.Module, config) -> None:
    """Checks (identical on every rank, no collective) and registration, before PEFT touches the model."""
    check_method(model, config)
    _check_lora_options(config)
    _resolve_all_linear(model, config)
    _check_targets(model, config)
    config._register_custom_module(LORA_LAYERS)


def _wrap_inject_adapter(original):
    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if tp_state(model) is not None:
            prepare(model, self.peft_config[adapter_name])
        return original(self, model, adapter_name, *args, **kwargs)
    return inject_adapter


def _wrap_peft_model_init(original):
    @functools.wraps(original)
    def __init__(self, model, peft_config, *args, **kwargs):
        if tp_state(model) is not None:
            check_method(model, peft_config)
        original(self, model, peft_config, *args, **kwargs)
    return __init__


def gather_adapter_state(model: nn.Module, local: dict, selected: dict) -> dict:
    """`selected` (PEFT's adapter state dict, values taken from `local`) with every TP shard made full.

    A value's origin is found by identity in `local`, whose keys are the model's parameter names, so the shard
    spec comes from the parameter's `tp_shard` tag. One object all-gather over the TP group for the whole adapter.
    """
    state = tp_state(model)
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
        if tp_state(model) is None:
            return original(model, state_dict, adapter_name, *args, **kwargs)
        local = _local_state_dict(model) if state_dict is None else state_dict
        selected = original(model, local, adapter_name, *args, **kwargs)
        return gather_adapter_state(model, local, selected)
    get_peft_model_state_dict._tp_plugin = True
    return get_peft_model_state_dict


def _wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        if tp_state(self) is None:
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


_ORIGINALS: list[tuple[object, str, object]] = []  # (owner, attribute, original), in installation order


def _replace(owner, name: str, wrapper) -> None:
    _ORIGINALS.append((owner, name, getattr(owner, name)))
    setattr(owner, name, wrapper(getattr(owner, name)))


def install() -> None:
    """Teach PEFT about split models (idempotent; `uninstall()` undoes it)."""
    if _ORIGINALS:
        return
    _replace(BaseTuner, "inject_adapter", _wrap_inject_adapter)
    _replace(PeftModel, "__init__", _wrap_peft_model_init)
    _replace(PeftModel, "save_pretrained", _wrap_save_pretrained)
    for module_name in _STATE_DICT_MODULES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "get_peft_model_state_dict"):
            _replace(module, "get_peft_model_state_dict", _wrap_get_state_dict)


def uninstall() -> None:
    """Put PEFT's own functions back (LoRA layers already built on a split model keep working)."""
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)
