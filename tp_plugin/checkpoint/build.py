"""A model with no memory behind it (meta device), its buffers computed, then its tensors filled from a source.

The split keeps state-dict names and tags every sharded parameter with its `tp_shard`, so once `parallelize`
has run on the meta model each parameter says exactly which rows of which checkpoint tensor it needs.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from .io import CheckpointError


@contextmanager
def zero3_init_off():
    """Build and load whole models (each rank its slices) even when a ZeRO-3 config is registered with transformers.

    An `Accelerator()` or `TrainingArguments` with a ZeRO-3 config registers it (`HfDeepSpeedConfig`), and from then
    on transformers builds every model under `deepspeed.zero.Init`, partitioned over all ranks: a TP split cannot
    start from that, and a meta model cannot be initialised by it. The split model is partitioned later, over its
    data-parallel group, by `deepspeed.initialize`. For the duration, transformers' registry reads as empty."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def build_on_meta(config, dtype: torch.dtype, auto_class=None, **model_kwargs) -> nn.Module:
    """The model for `config` with every parameter on the meta device (no memory, no init cost)."""
    auto_class = auto_class or transformers.AutoModelForCausalLM
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # (4.x's name)
    make = getattr(auto_class, "from_config", None)  # an Auto class
    if make is None:  # a model class: its code is already imported (trust_remote_code is the Auto classes' option)
        make = auto_class._from_config
        model_kwargs.pop("trust_remote_code", None)
    with torch.device("meta"):
        model = make(config, **{dtype_key: dtype}, **model_kwargs)
    _init_non_persistent_buffers(model)
    return model


def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Give non-persistent buffers (rotary `inv_freq`, Gemma's `embed_scale`) real memory and their values.

    They are not in checkpoints; transformers' `from_pretrained` computes them the same way: empty CPU
    tensors (`_move_missing_keys_from_meta_to_device`), then `initialize_weights()`, whose `_init_weights`
    recomputes rotary frequencies and embedding scales. On a meta model that init touches nothing else: the
    parameters stay on meta (init ops on meta tensors are no-ops).
    """
    named = getattr(model, "named_non_persistent_buffers", None)
    if named is None:  # transformers 4.x: rotary frequencies are its only non-persistent buffers; recompute them
        for module in model.modules():
            if getattr(module, "rope_init_fn", None) is not None and getattr(module, "inv_freq", None) is not None \
                    and module.inv_freq.is_meta:
                inv_freq, _ = module.rope_init_fn(module.config, torch.device("cpu"))
                module.register_buffer("inv_freq", inv_freq, persistent=False)
                module.original_inv_freq = inv_freq
        return
    for name, buffer in list(named()):
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        module._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    # The flag transformers sets on loaded weights: its init functions then skip them (on meta they would only
    # cost time). Removed afterwards so that the loaded parameters do not carry it.
    params = list(model.parameters())
    for param in params:
        param._is_hf_initialized = True
    model.initialize_weights()
    for param in params:
        del param._is_hf_initialized


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """For each distinct parameter: every (module, attribute, full name) that holds it (tied weights: several)."""
    owners: dict[int, list] = defaultdict(list)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners[id(param)].append((module, attr, f"{mod_name}.{attr}" if mod_name else attr))
    return owners


def key_in(source_names: set[str], names: list[str], prefix: str) -> str | None:
    """The checkpoint name of a tensor known to the model under `names` (several when tied).

    Base-model checkpoints (GPT-2's hub files: `h.0.attn...` for `transformer.h.0.attn...`) match too, the
    way transformers matches them.
    """
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
        for candidate in candidates:
            if candidate in source_names:
                return candidate
    return None


def tensors_to_load(model: nn.Module) -> list[tuple[list[str], torch.Tensor, list[tuple[nn.Module, str]], bool]]:
    """(names, tensor, owners, is_param) for every distinct parameter and persistent buffer still on meta."""
    out = []
    for names_owners in _owners(model).values():
        module, attr, _ = names_owners[0]
        out.append(([n for _, _, n in names_owners], module._parameters[attr],
                    [(m, a) for m, a, _ in names_owners], True))
    for mod_name, module in model.named_modules():
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta and attr not in module._non_persistent_buffers_set:
                out.append(([f"{mod_name}.{attr}" if mod_name else attr], buffer, [(module, attr)], False))
    return out


def check_source(model: nn.Module, source) -> None:
    """Every tensor the model needs is in the checkpoint with the full shape the model expects.

    Runs on the unsplit meta model, on every rank, before any collective, so a bad checkpoint fails everywhere
    with the same message instead of hanging the ranks that got further.
    """
    names = set(source.names())
    prefix = getattr(model, "base_model_prefix", "")
    missing, wrong = [], []
    for tensor_names, tensor, _, _ in tensors_to_load(model):
        key = key_in(names, tensor_names, prefix)
        if key is None:
            missing.append(tensor_names[0])
        elif tuple(source.shape(key)) != tuple(tensor.shape):
            wrong.append(f"{key} in {source.where(key)} has shape {list(source.shape(key))}, "
                         f"{type(model).__name__} expects {list(tensor.shape)}")
    if missing:
        raise CheckpointError(
            f"{source.directory}: {len(missing)} tensor(s) the model needs are not in the checkpoint: "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''} (the checkpoint has {len(names)} tensors, e.g. "
            f"{sorted(names)[:3]}). The checkpoint does not match its config.json "
            f"({type(model).__name__}): load it with the config it was saved with, or save it again.")
    if wrong:
        raise CheckpointError(f"{source.directory}: {len(wrong)} tensor(s) have the wrong shape: {wrong[0]}"
                              f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}. The weights do not "
                              f"match config.json: fix the config or save the checkpoint again.")


def materialize(model: nn.Module, source, *, show_progress: bool) -> None:
    """Replace every meta tensor by the rows this rank needs, read from `source`, one tensor at a time.

    A parameter is replaced by a new `nn.Parameter` carrying the old one's attributes (the TP tags), and put
    in every module that held the old one, so tied weights stay one tensor.
    """
    names = set(source.names())
    prefix = getattr(model, "base_model_prefix", "")
    todo = tensors_to_load(model)
    for tensor_names, tensor, owners, is_param in tqdm(todo, desc="loading shards", unit="tensor",
                                                       disable=not show_progress):
        key = key_in(names, tensor_names, prefix)
        data = source.read(key, getattr(tensor, "tp_shard", None))
        if tuple(data.shape) != tuple(tensor.shape):  # the plan and the reader disagree: a bug, never silent
            raise CheckpointError(f"{key}: read {list(data.shape)} for a shard of shape {list(tensor.shape)}")
        data = data.to(tensor.dtype)
        if is_param:
            new = nn.Parameter(data, requires_grad=tensor.requires_grad)
            new.__dict__.update(tensor.__dict__)  # tp_shard, tensor_model_parallel, partition_dim, ...
        else:
            new = data
        for module, attr in owners:
            (module._parameters if is_param else module._buffers)[attr] = new
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{type(model).__name__}: {left[:4]} still on the meta device after loading")
