"""Entering and leaving a tensor-parallel region (an attention, an MLP, a block of MoE experts).

A region is a module whose input feeds several column-parallel layers and whose output is made whole by a
reduction. Its entry is where the layout of the activations changes, so the one place that decides how:

                      plain TP                                   sequence parallel (training)
    entry (pre-hook)  column layers read a shared copy whose     all-gather of the tokens; the column
                      backward all-reduces (once for q, k, v)    layers' face reduce-scatters in backward
    exit              all-reduce (the row-parallel layer, or     reduce-scatter (same places)
                      the experts' output hook)

and the random stream: dropout between entry and exit acts on this rank's heads or features, so it draws from
the per-rank stream (`rng.RankStreams`), which the row-parallel exit (or the region's end) leaves again.

With `overlap` (the default) the column layers' shared face reduces its gradient through an `overlap.InputGrad`:
the reduction runs while the last column layer computes its weight gradient.

A region is one object (`Region`, installed on its module): its hooks are its `enter` and `leave`, the column
layers inside hold a weak reference to it, and each running call's state is a `Call` on its stack. The words:

    entry / exit  the region's pre-hook (layouts change, the per-rank random stream starts) and the reduction
                  that makes its output whole (a row-parallel layer, or the region's own `leave`)
    handed        the tensor the region's module gets as its input (under sequence parallelism: the gathered
                  tokens); a column layer fed exactly this tensor reads the face instead
    face          a view of the region's input with the backward its readers need: the column layers' face
                  reduces their partial input gradients once for all of them (q, k and v)
    input grad    that one pending reduction (`overlap.InputGrad`), started while the last weight gradient runs

What is not one call's but the whole forward's lives in the model's one `sequence.SequenceParallel`, which every
region of the model shares: the depth (regions entered and not yet left: the hooks between regions act at 0)
and the padding appended to this forward's sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .comm import all_gather_along, copy_to_tp, reduce_from_tp, start_all_reduce, start_reduce_scatter
from .overlap import InputGrad, shared_face
from .rng import RankStreams
from .sequence import SEQ_DIM, SequenceParallel, gather_tokens, scatter_tokens


@dataclass(frozen=True)
class RegionInputs:
    """Which inputs of a region's forward are activations (position, keyword); `ids` are integer inputs laid out
    like them (an MoE's chosen experts), gathered along with them under sequence parallelism.

    `columns_only`: only column-parallel computation reads the activations (MoE experts), so they are synced on
    entry. Otherwise (attention, MLP) the module gets them as they are (under sequence parallelism: gathered, with
    a backward for replicated consumers), and each column-parallel layer that reads them gets their synced face,
    made once per call and shared (`columns_input`): replicated computation on the region's input (a gate, a
    token shift) keeps its full gradient, and the column layers' partial gradients are reduced once."""

    activations: tuple[tuple[int, str], ...] = ((0, "hidden_states"),)
    ids: tuple[tuple[int, str], ...] = ()
    reduce_output: bool = False  # the region's own output is the partial sum (experts), not a row layer's
    columns_only: bool = False


HIDDEN_STATES = RegionInputs()


class Call:
    """One running call of a region: the tensor handed to the module, the face its column layers read instead
    (made on first use), the pending input-gradient reduction, sequence parallelism's saved-tensor hooks."""

    __slots__ = ("sequence", "keep", "handed", "make_columns", "columns", "input_grad", "given")

    def __init__(self, sequence: bool, keep, handed, make_columns, given):
        self.sequence, self.keep, self.handed, self.make_columns = sequence, keep, handed, make_columns
        self.columns = None
        self.input_grad: InputGrad | None = None
        self.given = given  # the inputs as the caller passed them (args, kwargs)


class Region:
    """One tensor-parallel region: how it enters and leaves (see the module docstring) and the stack of its
    running calls (a region called inside itself, e.g. gradient checkpointing's recomputation, nests)."""

    def __init__(self, group, sp: SequenceParallel | None, streams: RankStreams | None,
                 inputs: RegionInputs = HIDDEN_STATES, *, overlap: bool = True):
        self.group, self.sp, self.streams, self.inputs, self.overlap = group, sp, streams, inputs, overlap
        self.calls: list[Call] = []

    def columns_input(self, x: torch.Tensor, *, overlapped: bool = False):
        """The face of the running call's input if `x` is the tensor it handed over (else None), and the call's
        `InputGrad` when the face reduces through one. A reader that does not compute through
        `overlap.column_linear` (`overlapped=False`: a LoRA adapter) makes the call reduce synchronously."""
        call = self.calls[-1] if self.calls else None
        if call is None or call.handed is None or x is not call.handed:
            return None, None
        if call.columns is None:
            call.columns = call.make_columns()
        if call.input_grad is not None and not overlapped:
            call.input_grad.mixed = True
        return call.columns, call.input_grad

    def enter(self, module, args, kwargs):
        """The forward pre-hook: the inputs laid out for the region, the call pushed."""
        group, sp, streams, inputs = self.group, self.sp, self.streams, self.inputs
        given = (args, kwargs)
        args, kwargs = list(args), dict(kwargs)
        sequence = sp is not None and sp.active()
        call = Call(sequence, None, None, None, given)
        overlapped = self.overlap and not inputs.columns_only and torch.is_grad_enabled() \
            and not torch.compiler.is_compiling()
        for index, name in inputs.activations:
            x = _get(args, kwargs, index, name)
            if not torch.is_tensor(x) or not x.is_floating_point():
                continue
            first = call.handed is None and not inputs.columns_only
            input_grad = _make_input_grad(group, sequence) if first and overlapped else None
            if sequence:
                handed, other, keep = gather_tokens(sp, x, partial=inputs.columns_only)
                columns = (lambda other=other, input_grad=input_grad: other(input_grad))
                call.keep = call.keep or keep  # the first activation (the hidden states) is the one worth it
            else:
                handed = copy_to_tp(x, group) if inputs.columns_only else x
                columns = (lambda x=x, input_grad=input_grad: shared_face(x, x, input_grad) if input_grad
                           else copy_to_tp(x, group))
            if first:
                call.handed, call.make_columns, call.input_grad = handed, columns, input_grad
            _put(args, kwargs, index, name, handed)
        if sequence:
            for index, name in inputs.ids:
                ids = _get(args, kwargs, index, name)
                if torch.is_tensor(ids):
                    _put(args, kwargs, index, name, all_gather_along(ids, -2, group))
            sp.depth += 1
            if call.keep is not None:
                call.keep.hooks.__enter__()
        elif streams is not None and module.training:
            streams.enter("region")
        self.calls.append(call)
        return tuple(args), kwargs

    def leave(self, module, args, output):
        """The forward hook (always called): the call popped; the output reduced when the region's own output is
        the partial sum."""
        if not self.calls:
            return None
        call = self.calls.pop()
        sp, inputs = self.sp, self.inputs
        if call.keep is not None:
            call.keep.hooks.__exit__(None, None, None)
        if call.sequence:
            sp.depth -= 1
        if self.streams is not None:
            self.streams.leave("region")
        if output is None or not inputs.reduce_output:
            return None
        reduced = scatter_tokens(sp, output) if call.sequence else reduce_from_tp(output, self.group)
        after = getattr(module, "tp_after_reduce", None)  # a bias to add once (`styles.experts`)
        return reduced if after is None else after(*call.given, reduced, sp if call.sequence else None)


def install_region(module: nn.Module, group, sp: SequenceParallel | None, streams: RankStreams | None,
                   inputs: RegionInputs = HIDDEN_STATES, *, overlap: bool = True) -> Region:
    """Make `module` a region: its `Region`'s hooks on it; returns the region (its column layers refer to it)."""
    region = Region(group, sp, streams, inputs, overlap=overlap)
    module.register_forward_pre_hook(region.enter, with_kwargs=True)
    module.register_forward_hook(region.leave, always_call=True)
    return region


def install_row_exit(row: nn.Module, streams: RankStreams) -> None:
    """The per-rank random stream ends with the row-parallel layer (its output is replicated again)."""
    row.register_forward_hook(lambda mod, args, out: streams.leave("region"), always_call=True)


def _get(args, kwargs, index, name):
    if index < len(args):
        return args[index]
    return kwargs.get(name)


def _put(args: list, kwargs: dict, index, name, value) -> None:
    if index < len(args):
        args[index] = value
    else:
        kwargs[name] = value


def _make_input_grad(group, sequence: bool) -> InputGrad:
    if sequence:
        return InputGrad(lambda grad: start_reduce_scatter(grad, SEQ_DIM, group))
    return InputGrad(lambda grad: start_all_reduce(grad, group))
