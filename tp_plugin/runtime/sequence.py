"""Sequence parallelism (Megatron, Korthikanti et al. 2022): its state and the layout changes at region boundaries.

Between tensor-parallel regions the hidden states are split along the sequence: each rank holds seq/tp tokens,
and the norms, residual adds and dropout between regions run on those only. Each boundary swaps one collective
for two of half its size, so the bytes are the all-reduces' bytes:

    region entry (attention, MLP, experts, a lone column-parallel layer)   all-gather    | reduce-scatter (bwd)
    row-parallel layer (the region's exit)                                   reduce-scatter | all-gather (bwd)

A region's gathered input is not kept for backward: saved-tensor hooks keep this rank's chunk and gather it again
when backward needs it (Megatron does the same; keeping it would throw most of the saving away). How it is put on
an unmodified HF model (padding, the first and last decoder layers, the partial gradients): `sequence_hooks.py`.

Sequence parallelism is a training-time layout: in eval mode, and inside `generate()`, the same model runs the
plain TP path (all-reduces), which computes the same numbers and needs no padding of one-token decode steps.
"""
from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .comm import all_gather_along, all_reduce, reduce_scatter_along
from .grad_hooks import add_grad_hook
from .overlap import shared_face
from .rng import RankStreams

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
        """The state of a copied model: its base model and partial parameters are the copies (`tp_plugin.runtime.copies`)."""
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

def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns `t`'s memory (`t` itself unless it is a view)."""
    return t if t._base is None else t._base


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
        # the gathered tensor or a view of it (views point at the root: `full` may itself view the gather's buffer)
        if full is not None and (t is full or (t._base is not None and t._base is _root(full))):
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
