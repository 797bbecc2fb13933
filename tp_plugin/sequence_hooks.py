"""Putting sequence parallelism (`tp_plugin.runtime.sequence`) on an unmodified Hugging Face model, with hooks only:

* the base model's pre-hook pads the sequence to a multiple of tp, at the end (in a causal model no earlier
  token attends to a later one, so the padding changes nothing), and its post-hook strips the padding from its
  outputs: positions, masks and `.last_hidden_state` are what they always were;
* the first decoder layer's pre-hook keeps this rank's chunk of the (replicated) hidden states, and the last
  one's post-hook gathers them again. Megatron reduce-scatters straight out of the vocab-parallel embedding
  instead; here the model's own code between the embedding and the first layer (position embeddings added,
  masks and positions built from the embedding's shape) needs the whole sequence, so the embedding keeps its
  all-reduce: one all-gather's worth of bytes more per step, not per layer;
* replicated parameters that see only this rank's tokens (norms between regions, row-parallel biases) get their
  gradients summed over the TP group; which ones run between regions is seen in the first forward.

`decoder_layers` checks first, on every rank before any collective, that the model can be split so.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .runtime.comm import gather_along, split_along
from .runtime.sequence import SequenceParallel
from .sharding import TPSplitError

def decoder_layers(model: nn.Module, split_paths: list[str], regions: list[str]) -> str:
    """The path of the ModuleList of decoder layers that holds the split modules (`split_paths`), after checking
    that every layer holds some: a layer without (a state-space or convolution mixer of a hybrid model) would
    run on this rank's tokens only, and those mixers read the whole sequence. Likewise a token-mixing module
    kept whole (an attention the policy leaves replicated) outside every region."""
    lists: dict[str, set[int]] = {}
    for path in split_paths:
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if parts[i].isdigit() and isinstance(model.get_submodule(parent), nn.ModuleList):
                lists.setdefault(parent, set()).add(int(parts[i]))
                break
    if len(lists) != 1:
        raise TPSplitError(f"sequence_parallel=True needs the split modules in one list of decoder layers; found "
                           f"{sorted(lists) or 'none'}; use sequence_parallel=False for this model")
    (path, used), = lists.items()
    bare = sorted(set(range(len(model.get_submodule(path)))) - used)
    if bare:
        raise TPSplitError(f"sequence_parallel=True: decoder layers {bare} of {path} hold no tensor-parallel module "
                           f"(e.g. a state-space or convolution mixer), and those read the whole sequence; use "
                           f"sequence_parallel=False for this model")
    mixers = [name for name, m in model.get_submodule(path).named_modules()
              if _mixes_tokens(m) and not _inside(f"{path}.{name}", regions + split_paths)]
    if mixers:
        kinds = sorted({type(model.get_submodule(f"{path}.{n}")).__name__ for n in mixers})
        raise TPSplitError(f"sequence_parallel=True: {len(mixers)} module(s) of {path} mix tokens but are kept whole "
                           f"(replicated), e.g. {path}.{mixers[0]} ({', '.join(kinds)}): between regions each rank "
                           f"holds only its tokens, so they would see part of the sequence; use "
                           f"sequence_parallel=False for this model")
    return path


# Modules that read other tokens than their own: attention, convolutions over the sequence, recurrences.
_MIXES_TOKENS = re.compile(r"Attention|Attn|Mamba|Mixer|Conv|SSM|DeltaNet|Recurren|RWKV|LSTM|Retention|Hyena",
                           re.IGNORECASE)


def _mixes_tokens(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return True
    name = type(module).__name__  # not GPT-2's Conv1D (a transposed linear), not a norm (Mamba2RMSNorm)
    return name != "Conv1D" and "Norm" not in name and bool(_MIXES_TOKENS.search(name))


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") or r.startswith(path + ".") for r in roots)


def base_of(model: nn.Module, layers_path: str) -> nn.Module:
    """The module whose forward runs the decoder layers (and takes input_ids): `model` for `model.layers`."""
    return model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model


def install(model: nn.Module, sp: SequenceParallel, layers_path: str, replicated_modules: list[nn.Module]) -> None:
    """The hooks of the module docstring: pad/gather on the base model, scatter at the first decoder layer,
    and (first forward only) finding the replicated modules that run between regions."""
    base = base_of(model, layers_path)
    base.register_forward_pre_hook(_pad_inputs(sp), with_kwargs=True)
    base.register_forward_hook(_restore_outputs(sp), with_kwargs=True, always_call=True)
    layers = model.get_submodule(layers_path)
    layers[0].register_forward_pre_hook(_scatter_hidden(sp), with_kwargs=True)
    layers[-1].register_forward_hook(_gather_hidden(sp), always_call=True)
    for module in replicated_modules:
        sp._classify.append(module.register_forward_pre_hook(_note_between_regions(sp)))


def _note_between_regions(sp: SequenceParallel):
    def hook(module, args):
        if sp.active() and sp.depth == 0 and sp.in_span:
            for param in module.parameters(recurse=False):
                sp.add_partial(param)
    return hook


def _pad_inputs(sp: SequenceParallel):
    def hook(module, args, kwargs):
        if not sp.active():
            return None
        args = list(args)
        ids = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise TPSplitError(f"sequence_parallel: {type(module).__name__} got neither input_ids nor inputs_embeds")
        sp.pad = pad = (-ref.shape[1]) % sp.tp_size
        if pad == 0:
            return None
        if not sp.can_pad:
            raise TPSplitError(f"sequence_parallel: {ref.shape[1]} tokens do not divide by tp={sp.tp_size}, and "
                               f"{type(module).__name__} has attention that is not causal (it would see padding "
                               f"appended at the end); pad the batch to a multiple of {sp.tp_size} tokens")
        if args and torch.is_tensor(args[0]):
            args[0] = _pad_last(args[0], pad, 0)
        kwargs = dict(kwargs)
        for name, value in kwargs.items():
            if value is None or not torch.is_tensor(value):
                continue
            if name == "input_ids" or name == "token_type_ids":
                kwargs[name] = _pad_last(value, pad, 0)
            elif name == "inputs_embeds":
                kwargs[name] = torch.cat([value, value.new_zeros(value.shape[0], pad, *value.shape[2:])], dim=1)
            elif name == "attention_mask":
                if value.dim() != 2:
                    raise TPSplitError(
                        f"sequence_parallel: the sequence ({ref.shape[1]} tokens) does not divide by tp="
                        f"{sp.tp_size}, and a {value.dim()}-D attention_mask cannot be padded; pad the batch to a "
                        f"multiple of {sp.tp_size} tokens, or pass a 2-D [batch, seq] mask")
                kwargs[name] = _pad_last(value, pad, 1)
            elif name in ("position_ids", "cache_position"):
                step = torch.arange(1, pad + 1, device=value.device, dtype=value.dtype)
                kwargs[name] = torch.cat([value, value[..., -1:] + step], dim=-1)
        return tuple(args), kwargs
    return hook


def _pad_last(t: torch.Tensor, pad: int, value) -> torch.Tensor:
    return torch.cat([t, t.new_full((*t.shape[:-1], pad), value)], dim=-1)


def _scatter_hidden(sp: SequenceParallel):
    def hook(module, args, kwargs):
        if not sp.active():
            return None
        sp.depth, sp.in_span = 0, True
        sp.hook_partial()
        if sp.streams is not None:
            # transformers 4.x checkpoints a layer's __call__, hooks included: replaying layer 0 in backward
            # enters the span again (same seed, same masks) and leaves it to the checkpoint's RNG restore
            sp.streams.reset()
            sp.streams.enter("sequence")  # dropout on this rank's tokens: masks of its own
        if args:
            return (_split(sp, module, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _split(sp, module, kwargs["hidden_states"])}
    return hook


def _split(sp: SequenceParallel, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.shape[1] % sp.tp_size:
        raise TPSplitError(f"sequence_parallel: {type(layer).__name__} got {hidden.shape[1]} tokens, not a multiple "
                           f"of tp={sp.tp_size}; call the model through its base model's forward (which pads)")
    return split_along(hidden, 1, sp.group)


def _gather_hidden(sp: SequenceParallel):
    """After the last decoder layer: all tokens again (backward: this rank's chunk of the gradient, which the
    replicated final norm and the LM head make the same on every rank), so the base model's own code after its
    layers (a final norm, GPT-2's reshape to the input's shape) sees the sequence it expects."""
    def hook(module, args, output):
        if sp.in_span:
            _end_span(sp)
        if output is None or not sp.active():  # the forward raised, or plain TP
            return None
        if isinstance(output, tuple):
            return (_gather(sp, output[0]), *output[1:])
        return _gather(sp, output)
    return hook


def _gather(sp: SequenceParallel, hidden: torch.Tensor) -> torch.Tensor:
    return gather_along(hidden, 1, sp.group, grad_is_partial=False)


def _end_span(sp: SequenceParallel) -> None:
    sp.in_span = False
    if sp.streams is not None:
        sp.streams.leave("sequence")
    for handle in sp._classify:  # the modules between regions are known after one forward
        handle.remove()
    sp._classify.clear()


def _restore_outputs(sp: SequenceParallel):
    """The base model's outputs at the caller's sequence length: padding stripped, and the per-layer hidden
    states (`output_hidden_states=True`), still this rank's tokens, gathered."""
    def hook(module, args, kwargs, output):
        if sp.in_span:  # the forward raised inside the layers
            _end_span(sp)
        if output is None or not sp.active():
            return None
        first = output[0] if isinstance(output, tuple) else output.get("last_hidden_state")
        if first is None:
            return None
        return _restore(sp, output, first.shape[0], first.shape[1])
    return hook


def _restore(sp: SequenceParallel, output, batch: int, full: int):
    local, n = full // sp.tp_size, full - sp.pad

    def restore(t):
        if not torch.is_tensor(t) or t.dim() < 2:
            return t
        if t.shape[1] == local and t.shape[0] == batch:
            t = _gather(sp, t)
        if t.dim() == 4 and t.shape[-1] == full and t.shape[-2] == full:  # attention weights
            return t[..., :n, :n]
        return t[:, :n] if t.shape[1] == full and sp.pad else t

    if isinstance(output, tuple):
        return tuple(tuple(restore(x) for x in item) if isinstance(item, tuple) else restore(item)
                     for item in output)
    for key in list(output.keys()):
        value = output[key]
        if key == "past_key_values":
            if sp.pad and value is not None:
                output[key] = _crop_cache(sp, value)
        elif key == "router_logits" and isinstance(value, tuple):  # MoE: [batch * tokens, experts] per layer
            output[key] = tuple(restore(r.view(batch, -1, r.shape[-1])).reshape(-1, r.shape[-1]) for r in value)
        else:
            output[key] = tuple(restore(x) for x in value) if isinstance(value, tuple) else restore(value)
    return output


def _crop_cache(sp: SequenceParallel, cache):
    """Drop the padding's entries from a KV cache: a `Cache` crops itself; a legacy tuple of per-layer (key, value)
    tensors [batch, heads, seq, head_dim] (transformers 4.x GPT-2) is cut along the sequence."""
    if hasattr(cache, "crop"):
        return cache.crop(-sp.pad) or cache  # a negative length drops that many tokens at the end (returns None)
    if isinstance(cache, (tuple, list)) and all(isinstance(layer, (tuple, list)) for layer in cache):
        return type(cache)(tuple(t[..., : t.shape[-2] - sp.pad, :] if torch.is_tensor(t) and t.dim() == 4 else t
                                 for t in layer) for layer in cache)
    raise TPSplitError(f"sequence_parallel: {type(cache).__name__} holds {sp.pad} padding tokens and cannot be "
                       f"cropped; pass use_cache=False in training, or pad the batch to a multiple of "
                       f"tp={sp.tp_size} tokens")
