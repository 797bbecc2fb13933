"""A region's input-gradient reduction overlapped with weight-gradient computation (Megatron's asynchronous
dgrad/wgrad overlap, applied per region).

The column-parallel layers of a region (q, k, v; gate, up) read one face of its input, whose gradient is the sum
of their input gradients reduced once over the TP group: an all-reduce, a reduce-scatter under sequence
parallelism. Plainly that reduction starts when every column layer's backward has finished, weight gradients
included, and nothing runs while it does. Here each column layer's backward (`_ColumnLinear`) first computes its
input gradient and adds it to the call's `InputGrad`; the layer whose backward runs last (the first one in the
forward: the q projection, the gate projection) starts the reduction asynchronously, computes its weight and
bias gradients while the collective runs, and waits. The face (`_SharedFace`) hands the reduced gradient on.

Safe fallbacks, all synchronous as before: anything else reading the face (a LoRA adapter: `mixed`) makes its
layers return their input gradients the ordinary way; a layer whose backward never runs (an output the loss does
not use) leaves the reduction to the face; under `torch.compile` or without autograd no `InputGrad` is made.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .comm import Pending


class InputGrad:
    """The input gradient of one call of a region's column layers. `start(grad) -> Pending` reduces a gradient
    over the group (the caller's tensor, overwritten); `users` counts the layers that computed with the face."""

    __slots__ = ("start", "users", "pending", "total", "reduced", "mixed")

    def __init__(self, start: Callable[[torch.Tensor], Pending]):
        self.start = start
        self.users, self.pending, self.mixed = 0, 0, False
        self.total: torch.Tensor | None = None
        self.reduced: torch.Tensor | None = None

    def add(self, grad: torch.Tensor) -> bool:
        """Add one layer's input gradient; True for the last layer (all of them are in)."""
        self.total = grad if self.total is None else self.total.add_(grad)
        self.pending -= 1
        return self.pending == 0

    def finish(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """The face's gradient: what the last layer reduced, plus the reduction of anything autograd delivered
        (the mixed case, or layers whose backward did not all run)."""
        late = grad if self.total is None or self.reduced is not None else \
            self.total if grad is None else self.total.add_(grad)
        out = self.reduced
        if late is not None:
            late = self.start(late.clone() if late is grad else late).wait()
            out = late if out is None else out + late
        self.total, self.reduced, self.pending = None, None, self.users  # ready for another backward (retain_graph)
        return out


class _SharedFace(torch.autograd.Function):
    """Forward: `shown` (the region's input, or under sequence parallelism all its tokens) as a view. Backward:
    the reduced input gradient of `local`, the tensor this rank holds."""

    @staticmethod
    def forward(ctx, local, shown, input_grad):
        ctx.input_grad = input_grad
        ctx.set_materialize_grads(False)
        return shown.view_as(shown)

    @staticmethod
    def backward(ctx, grad):
        return ctx.input_grad.finish(grad), None, None


def shared_face(local: torch.Tensor, shown: torch.Tensor, input_grad: InputGrad) -> torch.Tensor:
    return _SharedFace.apply(local, shown, input_grad)


def _autocast(*tensors):
    """The tensors as autocast would hand them to a matmul (our backward then runs on the same dtypes)."""
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class _ColumnLinear(torch.autograd.Function):
    """`x W^T + b` (`x W + b` for a transposed Conv1D weight) whose backward feeds the region's `InputGrad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, input_grad, transposed):
        x, weight, bias = _autocast(x, weight, bias)
        ctx.input_grad, ctx.transposed, ctx.has_bias = input_grad, transposed, bias is not None
        ctx.save_for_backward(x, weight)
        input_grad.users += 1
        input_grad.pending += 1
        if transposed:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        input_grad = ctx.input_grad
        flat_grad = grad.reshape(-1, grad.shape[-1])
        dgrad = (flat_grad @ (weight.t() if ctx.transposed else weight)).view(x.shape)
        last = not input_grad.mixed and input_grad.add(dgrad)
        pending = input_grad.start(input_grad.total) if last else None
        wgrad = bgrad = None  # computed while the reduction runs
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            wgrad = flat_x.t() @ flat_grad if ctx.transposed else flat_grad.t() @ flat_x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            bgrad = flat_grad.sum(0)
        if pending is not None:
            with torch.profiler.record_function("tp_plugin.runtime.overlap: wait for the input-gradient reduction"):
                input_grad.reduced = pending.wait()
        return (dgrad if input_grad.mixed else None), wgrad, bgrad, None, None


def column_linear(x, weight, bias, input_grad: InputGrad, *, transposed: bool) -> torch.Tensor:
    return _ColumnLinear.apply(x, weight, bias, input_grad, transposed)
