"""Sequence parallelism (Megatron, Korthikanti et al. 2022) on an unmodified Hugging Face model.

Between tensor-parallel regions the hidden states are split along the sequence: each rank holds seq/tp tokens,
and the norms, residual adds and dropout between regions run on those only. Each boundary swaps one collective
for two of half its size, so the bytes are the all-reduces' bytes:

    region entry (attention, MLP, experts, a lone column-parallel layer)   all-gather    | reduce-scatter (bwd)
    row-parallel layer (the region's exit)                                   reduce-scatter | all-gather (bwd)

It is put on the model with hooks, without touching the model's forward code:

* the base model's pre-hook pads the sequence to a multiple of tp, at the end (in a causal model no earlier
  token attends to a later one, so the padding changes nothing), and its post-hook strips the padding from its
  outputs: positions, masks and `.last_hidden_state` are what they always were;
* the first decoder layer's pre-hook keeps this rank's chunk of the (replicated) hidden states, and the last
  one's post-hook gathers them again. Megatron reduce-scatters straight out of the vocab-parallel embedding
  instead; here the model's own code between the embedding and the first layer (position embeddings added,
  masks and positions built from the embedding's shape) needs the whole sequence, so the embedding keeps its
  all-reduce: one all-gather's worth of bytes more per step, not per layer;
* a region's gathered input is not kept for backward: saved-tensor hooks keep this rank's chunk and gather it
  again when backward needs it (Megatron does the same; keeping it would throw most of the saving away);
* replicated parameters that see only this rank's tokens (norms between regions, row-parallel biases) get their
  gradients summed over the TP group; which ones run between regions is seen in the first forward.

Sequence parallelism is a training-time layout: in eval mode, and inside `generate()`, the same model runs the
plain TP path (all-reduces), which computes the same numbers and needs no padding of one-token decode steps.
"""

from __future__ import annotations

import copy
import re
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .comm import all_gather_along, all_reduce, gather_along, reduce_scatter_along, split_along
from .grad_hooks import add_grad_hook
from .overlap import shared_face
from .rng import RankStreams
from .sharding import TPSplitError

SEQ_DIM = -2  # [batch, seq, hidden] and flattened [tokens, hidden] alike


class SequenceParallel:
    """The sequence-parallel state of one split model (shared by its hooks and layers)."""

    def __init__(self, base: nn.Module, group: dist.ProcessGroup, streams: RankStreams | None):
        self._base = weakref.ref(base)
        self.group, self.tp_size = group, dist.get_world_size(group)
        self.streams = streams
        self.suspended = 0  # > 0 inside generate(): plain TP
        self.pad = 0  # tokens appended to the current forward's sequence
        self.depth = 0  # regions entered and not yet left (between regions: 0)
        self.partial: dict[int, nn.Parameter] = {}  # replicated parameters that see this rank's tokens only
        self._hooked: set[int] = set()
        self._classify: list = []  # the hooks that look for them (first sequence-parallel forward only)
        self.in_span = False  # between the first layer's scatter and the base model's gather
        # padding at the end is invisible only to causal mixers (every attention says is_causal=True; scans are)
        flags = [getattr(m, "is_causal", True) for m in base.modules()
                 if isinstance(getattr(m, "is_causal", None), bool) or hasattr(m, "ssm_state_size")]
        self.can_pad = bool(flags) and all(flags)

    def __deepcopy__(self, memo):
        """The state of a copied model: its base model and partial parameters are the copies (`tp_plugin.copies`)."""
        new = copy.copy(self)
        memo[id(self)] = new
        for key, value in vars(self).items():
            setattr(new, key, copy.deepcopy(value, memo))
        base = self._base()
        new._base = weakref.ref(copy.deepcopy(base, memo)) if base is not None else self._base
        new.partial, new._hooked = {}, set()
        for key, param in self.partial.items():
            new.adopt(param, copy.deepcopy(param, memo), into=self)
        return new

    def adopt(self, original: torch.Tensor, new: torch.Tensor, *, into: SequenceParallel | None = None) -> None:
        """`new` (a copy of `original`, with its gradient hooks already) is partial wherever `original` is."""
        known = into if into is not None else self
        if id(original) in known.partial:
            self.partial[id(new)] = new
            if id(original) in known._hooked:
                self._hooked.add(id(new))

    def active(self) -> bool:
        """Whether the current forward runs sequence-parallel (training mode, not generating)."""
        base = self._base()
        return base is not None and base.training and not self.suspended

    @contextmanager
    def suspend(self):
        """Run plain TP inside this block (generate: its decode steps have one token)."""
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1

    def sum_partial_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient hook of a parameter that sees this rank's tokens only under sequence parallelism."""
        return all_reduce(grad.clone(), self.group) if self.active() else grad

    def add_partial(self, param: nn.Parameter) -> None:
        param.tp_sequence_partial_grad = True
        self.partial[id(param)] = param
        self.hook_partial()

    def hook_partial(self) -> None:
        """Give every trainable partial parameter its gradient sum (a frozen one gets it once it is unfrozen:
        PEFT's `bias="all"`, or a user unfreezing the norms after the split)."""
        for param in self.partial.values():
            if param.requires_grad and id(param) not in self._hooked:
                add_grad_hook(param, self.sum_partial_grad)
                self._hooked.add(id(param))


# ---- entering and leaving a tensor-parallel region ---------------------------------------------------------------

class _RegatherInBackward:
    """Saved-tensor hooks for one region's forward: whatever autograd saves of the gathered input (the input
    of q/k/v or of the MLP's up-projections, or a view of it) is saved as this rank's chunk instead, and
    gathered again, once, when backward first needs it. Other saved tensors go to the hooks already in place
    (gradient checkpointing's, a memory probe's), and so does the chunk: under checkpointing nothing is kept."""

    def __init__(self, local: torch.Tensor, full: torch.Tensor, group):
        self.full_ref, self.group = weakref.ref(full), group
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # before ours are pushed
        self.local: torch.Tensor | None = local
        self.packed = self.unpacked = 0
        self.cache: torch.Tensor | None = None
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        full = self.full_ref()
        if full is not None and (t is full or t._base is full):
            if self.packed == 0 and self.outer:  # the chunk is saved once, through the hooks already in place
                self.local = self.outer[0](self.local)
            self.packed += 1
            return (self, t.shape, t.stride(), t.storage_offset())
        return (None, self.outer[0](t)) if self.outer else (None, t)

    def unpack(self, packed):
        if packed[0] is None:
            return self.outer[1](packed[1]) if self.outer else packed[1]
        _, shape, stride, offset = packed
        if self.cache is None:
            local = self.outer[1](self.local) if self.outer else self.local
            self.cache = all_gather_along(local, SEQ_DIM, self.group)
        full = self.cache
        self.unpacked += 1
        if self.unpacked == self.packed:
            self.cache = None  # every consumer has it: free the gathered copy
        return full.as_strided(shape, stride, offset)


class _Face(torch.autograd.Function):
    """One face of this rank's tokens all-gathered once (`gathered`, no autograd): the forward is a view of the
    gathered tensor; backward gives this rank's chunk of the gradient, reduce-scattered when the consumers'
    gradients are partial sums (column-parallel layers), or just sliced when they are full and equal on every
    rank (replicated computation inside the region)."""

    @staticmethod
    def forward(ctx, local, gathered, group, partial):
        ctx.group, ctx.partial, ctx.size = group, partial, local.shape[SEQ_DIM]
        return gathered.view_as(gathered)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return reduce_scatter_along(grad, SEQ_DIM, ctx.group), None, None, None
        rank = dist.get_rank(ctx.group)
        return grad.narrow(SEQ_DIM, rank * ctx.size, ctx.size).contiguous(), None, None, None


def gather_tokens(sp: SequenceParallel, x: torch.Tensor, *, partial: bool = True):
    """This rank's tokens -> all tokens; a function making the other face (`_Face`, or given an `overlap.InputGrad`
    the column layers' `overlap.shared_face`) of the same gathered tensor without another collective; the saved-tensor
    hooks keeping only this rank's chunk for backward (None under torch.compile, or without autograd)."""
    gathered = all_gather_along(x, SEQ_DIM, sp.group)
    face = _Face.apply(x, gathered, sp.group, partial)
    other = lambda input_grad=None: shared_face(x, gathered, input_grad) if input_grad is not None \
        else _Face.apply(x, gathered, sp.group, not partial)  # noqa: E731
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return face, other, None
    return face, other, _RegatherInBackward(x, gathered, sp.group)


def scatter_tokens(sp: SequenceParallel, partial: torch.Tensor) -> torch.Tensor:
    """Partial sums over all tokens -> the summed rows of this rank's tokens (backward: all-gather)."""
    return reduce_scatter_along(partial, SEQ_DIM, sp.group)


# ---- installing it on a model ----------------------------------------------------------------------------------------

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
