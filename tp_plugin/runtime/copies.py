"""`copy.deepcopy` of a split model, or of one split layer: an independent copy on the same process groups.

Python's own deep copy of a split model fails (the layers hold process groups, which cannot be copied), and
even where it got through it would be silently wrong: torch's `Parameter.__deepcopy__` drops the TP tags and
gradient hooks, weakrefs (a column layer's region, the LM head weight's head, the sequence-parallel state's
base model) and the closures of tp_plugin's forward hooks would go on pointing at the original. Copies are
what EMA (`torch.optim.swa_utils.AveragedModel`), frozen reference models (TRL) and PEFT's `modules_to_save`
make, so `__deepcopy__` is defined here for both cases:

* a split model (`__deepcopy__` bound on it by the split): the process groups and meshes are shared, and
  everything else is copied: its parameters with their tags and gradient hooks, its plan, its
  sequence-parallel state, its input checks; the weakrefs and the closure cells of tp_plugin's hooks are
  pointed at the copies. The copy computes the same numbers and trains on its own.
* one parallel layer (`ParallelLayer.__deepcopy__`), e.g. PEFT's `modules_to_save` copy of `o_proj` or of the
  LM head, which lives next to the original inside the same model: its parameters are copied (tags and
  gradient hooks kept); what belongs to the model around it (the groups, the sequence-parallel state, its
  region, the hooks' closures) is shared.

Not supported: a model sharded by FSDP2 (copy it before `tp_plugin.fully_shard`).
"""

from __future__ import annotations

import copy
import types
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..sharding import TPSplitError

_IN_MODEL_COPY = object()  # a key in the memo: a layer reached from inside a model copy copies plainly
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def bind(model: nn.Module) -> None:
    """Give the split model its `__deepcopy__` (an instance attribute: copy.deepcopy looks it up there)."""
    model.__deepcopy__ = types.MethodType(deepcopy_model, model)


def deepcopy_model(self: nn.Module, memo: dict) -> nn.Module:
    state = getattr(self, "tp_plugin_state", None)  # bound on the split model itself
    if state is not None and state.fsdp:
        raise TPSplitError(f"copy.deepcopy of a split {type(self).__name__} sharded by FSDP2: its parameters are "
                           f"FSDP2's DTensors over the data-parallel group. Make the copy before "
                           f"tp_plugin.fully_shard(model), and shard the copy too if it trains")
    _share_groups(self, memo)
    if state is not None and state.mesh is not None:
        memo.setdefault(id(state.mesh), state.mesh)
    memo[id(_IN_MODEL_COPY)] = True
    new = _plain_copy(self, memo)
    originals = dict(named_tensors(self))
    for name, tensor in named_tensors(new):
        _carry_tensor_state(originals[name], tensor, memo)
    for module in new.modules():
        _point_into_copy(vars(module), memo)
        for value in vars(module).values():
            if _is_plain_object(value):
                _point_into_copy(vars(value), memo)
        for hooks in (getattr(module, name, None) for name in _HOOK_DICTS):
            for key, hook in list((hooks or {}).items()):
                hooks[key] = _copy_closure(hook, memo)
    return new


def deepcopy_layer(self: nn.Module, memo: dict) -> nn.Module:
    """A parallel layer's `__deepcopy__`: see the module docstring."""
    if id(_IN_MODEL_COPY) in memo:
        return _plain_copy(self, memo)  # the model copy fixes its tensors, weakrefs and hooks
    _share_groups(self, memo)
    for module in self.modules():  # the model's state around the layer stays the model's
        for value in vars(module).values():
            if _is_plain_object(value) or isinstance(value, weakref.ref):
                memo.setdefault(id(value), value)
    new = _plain_copy(self, memo)
    originals, sequence = dict(named_tensors(self)), getattr(self, "sequence", None)
    for name, tensor in named_tensors(new):
        _carry_tensor_state(originals[name], tensor, memo)
        if sequence is not None:  # partial (token-local) gradients are summed for the copy too
            sequence.adopt(originals[name], tensor)
    return new


def _plain_copy(obj: nn.Module, memo: dict) -> nn.Module:
    """What copy.deepcopy does for a module without `__deepcopy__` (its state through the memo)."""
    cls = type(obj)
    new = cls.__new__(cls)
    memo[id(obj)] = new
    new.__setstate__(copy.deepcopy(dict(vars(obj)), memo))
    return new


def _share_groups(model: nn.Module, memo: dict) -> None:
    """Process groups and device meshes are the processes' own: every copy uses the same ones."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, (dist.ProcessGroup, DeviceMesh)):
                memo.setdefault(id(value), value)


def named_tensors(model: nn.Module):
    """Every parameter (tied ones under each of their names) and buffer, by name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _carry_tensor_state(original: torch.Tensor, new: torch.Tensor, memo: dict) -> None:
    """The tags (`tp_shard`, Megatron's flags, ...) and the recorded gradient hooks, once per tensor."""
    if not vars(original) or vars(new):
        return
    state = copy.deepcopy(dict(vars(original)), memo)
    _point_into_copy(state, memo)
    hooks = [_copy_closure(h, memo) for h in state.get("tp_grad_hooks", ())]
    if hooks:
        state["tp_grad_hooks"] = hooks
    vars(new).update(state)
    for hook in hooks:
        new.register_hook(hook)


def _point_into_copy(attributes: dict, memo: dict) -> None:
    """Weakrefs to objects that were copied now refer to the copies."""
    for key, value in list(attributes.items()):
        if isinstance(value, weakref.ref):
            target = value()
            if target is not None and id(target) in memo and memo[id(target)] is not target:
                attributes[key] = weakref.ref(memo[id(target)])


def _copy_closure(fn, memo: dict):
    """A tp_plugin hook that is a closure, with its cells copied through the memo (so it acts on the copy)."""
    if not isinstance(fn, types.FunctionType) or not fn.__closure__ or not fn.__module__.startswith("tp_plugin"):
        return fn
    cells = tuple(types.CellType(copy.deepcopy(c.cell_contents, memo)) if _filled(c) else types.CellType()
                  for c in fn.__closure__)
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__, new.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    return new


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _is_plain_object(value) -> bool:
    """A tp_plugin object held by a module (its input checks, DeepSpeed hook, ...), not a module or tensor."""
    return type(value).__module__.startswith("tp_plugin") and hasattr(value, "__dict__") \
        and not isinstance(value, (nn.Module, torch.Tensor, type))
