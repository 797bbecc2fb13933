"""The logits of a training forward, computed only if someone reads them.

A split LM head in training mode returns `DeferredLogits`: a tensor of the logits' shape, dtype and device that
holds no values, only the head's input and the head. The causal-LM loss (`loss.CausalLMLoss`, the model's
`loss_function`) recognises it and computes the loss from the hidden states and this rank's head shard in token
chunks (`loss.fused_vocab_parallel_cross_entropy`): a Trainer, TRL or plain-loop step that only uses `.loss`
never builds `[tokens, vocab]` logits, nor their all-gather.

Whoever does read them gets the real thing. The first torch operation on the tensor (indexing, `argmax`, a
metric, `print`, `.cpu()`, a loss of one's own) computes the logits exactly as an eager head would: all-gathered
full logits (with `loss_parallel`: this rank's vocabulary shard), differentiable, under the grad mode and autocast
of the forward that made them; the result is kept, so a second read costs nothing. Metadata (`shape`, `dtype`,
`device`, `size()`, `dim()`) is answered without computing anything. The elementwise transforms models apply
between their head and their loss (Gemma 2's soft-capping `tanh(z / c) * c`, Cohere's `z * scale`, Granite's
`z / scale`, `.float()`) are recorded instead of run, and the fused loss applies them to each chunk; so is
`.clone()`, which DDP's output sink calls inside an autograd Function's forward (logits computed there would not
be connected to the gradient that reaches them).

The placeholder is the output of `_Anchor`, an autograd Function of the hidden states and the head's weight that
no gradient ever flows through: engines that look for the parameters an output reaches (DDP with
`find_unused_parameters`) find what eager logits would reach. Hooks registered on it (FSDP2's pre-backward) go
to the computed logits, if any.

Two reads cannot give what an eager head would have given, and are errors instead of a wrong number:

* a read on some ranks of the TP group only (`if rank == 0: print(out.logits)`): the gather needs every rank, so
  the ranks meet in the store first (`arrival.arrive_together`) and a lone reader gets a `TPSplitError` after
  `TP_PLUGIN_ARRIVAL_TIMEOUT` seconds, not a hang;
* a read after the head's weight changed (`optimizer.step()` between the forward and the read), or after FSDP2
  resharded it: the logits would be those of the new weights. Read them before the step, or turn deferral off for
  the model (`model.get_output_embeddings().defer_logits = False`: every training forward then computes them
  eagerly).
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext

import torch

from .arrival import arrive_together
from .devices import autocast_dtype
from ..sharding import TPSplitError

Tensor = torch.Tensor

# answered from the placeholder, no logits computed
_METADATA = frozenset({
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.requires_grad.__get__,
    Tensor.ndim.__get__, Tensor.is_leaf.__get__, Tensor.grad_fn.__get__, Tensor.layout.__get__, Tensor._base.__get__,
    Tensor.is_cuda.__get__, Tensor.is_sparse.__get__, Tensor.is_quantized.__get__, Tensor.is_meta.__get__,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.element_size, Tensor.get_device, Tensor.__hash__,
})
# elementwise transforms by a Python number, recorded for the loss to apply per chunk
_SCALAR_OPS = {Tensor.__truediv__: "div", Tensor.div: "div", torch.div: "div", Tensor.__mul__: "mul",
               Tensor.__rmul__: "mul", Tensor.mul: "mul", torch.mul: "mul"}
_TANH = frozenset({Tensor.tanh, torch.tanh})


class _Source:
    """What the head was given, and the state of the forward that gave it."""

    def __init__(self, hidden: Tensor, head):
        # the weight as it is now: FSDP2 swaps the module's attribute back to its shard after the forward
        self.hidden, self.head, self.weight, self.bias = hidden, head, head.weight, head.bias
        self.versions = self._versions()
        self.grad_enabled = torch.is_grad_enabled()
        self.autocast = autocast_dtype(hidden.device.type)

    def _versions(self) -> tuple[int, ...]:
        tensors = (self.hidden, self.weight, self.bias)
        return tuple(t._version for t in tensors if t is not None)

    def compute(self) -> Tensor:
        head = self.head
        if self.weight.untyped_storage().nbytes() == 0:
            raise TPSplitError(
                "tp_plugin: the logits of a training forward were read after the engine released the LM head's "
                "weight (FSDP2 reshards it after backward); they are computed when first read. Read out.logits "
                "before backward, or set model.get_output_embeddings().defer_logits = False before wrapping")
        if self._versions() != self.versions:
            raise TPSplitError(
                "tp_plugin: the logits of a training forward were read after the LM head's weight (or its input) "
                "changed in place, e.g. by optimizer.step(); they are computed when first read, so they would be "
                "the new weights' logits. Read out.logits before the optimizer step, or set "
                "model.get_output_embeddings().defer_logits = False to compute them in every training forward")
        if head.gather_output:
            arrive_together("reading the logits of a training forward", "read out.logits on every rank of the "
                            "tensor-parallel group (their all-gather needs each rank's vocabulary shard), e.g. "
                            "`logits = out.logits.detach()` on all ranks, then print on one", group=head.group)
        device = self.hidden.device.type
        autocast = nullcontext() if not torch.amp.is_autocast_available(device) else \
            torch.autocast(device, dtype=self.autocast, enabled=self.autocast is not None)
        with torch.set_grad_enabled(self.grad_enabled), autocast:
            return head.eager_logits(self.hidden, self.weight, self.bias, gather=head.gather_output)


class DeferredLogits(Tensor):
    """Stands for `head(hidden)` (the root) or for `op(parent)`; see the module docstring. An `op` is
    ("mul" | "div", number), ("tanh", None), ("cast", dtype), ("clone", None) or ("contiguous", None)."""

    source: _Source
    parent: "DeferredLogits | None"
    op: tuple | None
    _value: Tensor | None

    @staticmethod
    def __new__(cls, source: _Source, parent: "DeferredLogits | None" = None, op: tuple | None = None,
                dtype: torch.dtype | None = None):
        head, hidden = source.head, source.hidden
        width = head.spec.full_size if head.gather_output else head.weight.shape[0]
        if dtype is None:
            dtype = autocast_dtype(hidden.device.type) or hidden.dtype
        inputs = [t for t in (hidden, source.weight, source.bias) if t is not None]
        self = _Anchor.apply((*hidden.shape[:-1], width), dtype, *inputs).as_subclass(cls)
        self.source, self.parent, self.op, self._value = source, parent, op, None
        self._hooks = []
        return self

    @classmethod
    def deferred(cls, hidden: Tensor, head) -> "DeferredLogits":
        return cls(_Source(hidden, head))

    @property
    def ops(self) -> tuple:
        """The elementwise transforms from the head's logits to these, in order (casts and copies left out: the
        fused loss computes in float32 and copies nothing)."""
        chain, node = [], self
        while node.parent is not None:
            if node.op[0] in ("mul", "div", "tanh"):
                chain.append(node.op)
            node = node.parent
        return tuple(reversed(chain))

    def materialize(self) -> Tensor:
        if self._value is None:
            if self.parent is None:
                value = self.source.compute()
            else:
                value, (kind, arg) = self.parent.materialize(), self.op
                value = torch.tanh(value) if kind == "tanh" else value * arg if kind == "mul" else \
                    value / arg if kind == "div" else value.to(arg) if kind == "cast" else \
                    value.contiguous() if kind == "contiguous" else value.clone()
            for hook in self._hooks if value.requires_grad else ():
                value.register_hook(hook)
            self._value = value
        return self._value

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        this = args[0] if args and isinstance(args[0], DeferredLogits) else None
        if func in _METADATA and (this is None or this._value is None):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if this is not None and this._value is None:
            op = _recorded(this, func, args, kwargs)
            if op is not None:
                dtype = op[1] if op[0] == "cast" else this.dtype
                return DeferredLogits(this.source, this, op, dtype)
            if func is Tensor.register_hook and len(args) == 2:  # FSDP2, DeepSpeed: no gradient ever reaches a
                this._hooks.append(args[1])                     # tensor nobody computes; on the value if one is
                return None
        return func(*_materialized(args), **_materialized(kwargs))


class _Anchor(torch.autograd.Function):
    """The placeholder: one element, strides 0 (not a view: FSDP2 warns about views), differentiable in the head's
    input and weight. DDP with `find_unused_parameters` (the Trainer's default) looks for the parameters an output
    reaches when the forward ends: through the anchor it finds the head's weight and the body, as it would from
    eager logits, so the logits computed later add no use it did not expect. No gradient ever flows through it:
    a read uses the computed logits, not the placeholder."""

    @staticmethod
    def forward(ctx, shape, dtype, *inputs):
        return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=inputs[0].device)

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + (None,) * len(ctx.needs_input_grad[2:])


def _recorded(this: DeferredLogits, func, args, kwargs) -> tuple | None:
    """The op `func(*args, **kwargs)` applies to `this`, if it is one that is recorded rather than run."""
    if kwargs and func not in (Tensor.to, Tensor.clone):
        return None
    other = args[1] if len(args) == 2 else None
    if func in _SCALAR_OPS and isinstance(other, numbers.Real) and not isinstance(other, bool):
        return _SCALAR_OPS[func], float(other)
    if func in _TANH and len(args) == 1:
        return "tanh", None
    if func is Tensor.float and len(args) == 1:
        return "cast", torch.float32
    if func is Tensor.to and len(args) == 2 and isinstance(other, torch.dtype) and other.is_floating_point \
            and set(kwargs) <= {"copy"}:
        return "cast", other
    # DDP with find_unused_parameters passes its outputs through an autograd Function that clones them inside its
    # forward, where nothing computed would stay connected to the gradient: a copy is recorded, made when read
    if func is Tensor.clone and len(args) == 1 and kwargs.get("memory_format", torch.preserve_format) \
            is torch.preserve_format:
        return "clone", None
    if func is Tensor.contiguous and len(args) == 1 and not kwargs:  # OPT's head output: values unchanged
        return "contiguous", None
    return None


def _materialized(value):
    if isinstance(value, DeferredLogits):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialized(v) for k, v in value.items()}
    return value

