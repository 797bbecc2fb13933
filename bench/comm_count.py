"""Count collectives and bytes per rank at the dispatcher, whoever issues them.

A `TorchDispatchMode` sees every `c10d::` op (what `torch.distributed.all_reduce` & co. dispatch to), every
`_c10d_functional::` op (DTensor, so transformers' own TP) and DeepSpeed's `inference_all_reduce_`, so the
same counter works for tp_plugin, DeepSpeed AutoTP and transformers' TP. Bytes are this rank's payload: the
tensor reduced, broadcast or contributed to a gather.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# op name (namespace::name without overload) -> (kind, index of the argument holding this rank's payload)
_OPS = {
    "c10d::allreduce_": ("all_reduce", 0), "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::allgather_": ("all_gather", 1), "c10d::_allgather_base_": ("all_gather", 1),
    "c10d::allgather_coalesced_": ("all_gather", 1), "c10d::allgather_into_tensor_coalesced_": ("all_gather", 1),
    "c10d::reduce_scatter_": ("reduce_scatter", 1), "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::broadcast_": ("broadcast", 0), "c10d::alltoall_": ("all_to_all", 1),
    "c10d::alltoall_base_": ("all_to_all", 1), "c10d::reduce_": ("reduce", 0), "c10d::gather_": ("gather", 1),
    "c10d::scatter_": ("scatter", 1), "c10d::barrier": ("barrier", None),
    "_c10d_functional::all_reduce": ("all_reduce", 0), "_c10d_functional::all_reduce_": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced_": ("all_reduce", 0),
    "_c10d_functional::all_gather_into_tensor": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor_out": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor_coalesced": ("all_gather", 0),
    "_c10d_functional::reduce_scatter_tensor": ("reduce_scatter", 0),
    "_c10d_functional::reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "_c10d_functional::all_to_all_single": ("all_to_all", 0), "_c10d_functional::broadcast": ("broadcast", 0),
    "_c10d_functional::broadcast_": ("broadcast", 0),
    "deepspeed::inference_all_reduce_": ("all_reduce", 0), "deepspeed::inference_all_reduce": ("all_reduce", 0),
}


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, ...
    op: str  # the dispatcher op, e.g. c10d::allreduce_
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _op_name(func) -> str:
    return f"{func.namespace}::{func._schema.name.split('::', 1)[-1]}"


def _group_size(args, kwargs) -> int | None:
    """Size of the process group a collective runs on (c10d ops carry the group, functional ops its name)."""
    for arg in list(args) + list((kwargs or {}).values()):
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg._type()):
            return dist.ProcessGroup.unbox(arg).size()
        if isinstance(arg, dist.ProcessGroup):
            return arg.size()
        if isinstance(arg, str):
            try:
                return _resolve_process_group(arg).size()
            except Exception:  # not a group name (e.g. a reduce op given as a string)
                continue
    return None


class CommCounter(TorchDispatchMode):
    """`with CommCounter() as c: step()`; then `c.calls` (in order), `c.summary()`."""

    def __init__(self):
        super().__init__()
        self.calls: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        entry = _OPS.get(name)
        if entry is None and func.namespace in ("c10d", "_c10d_functional", "deepspeed") \
                and not any(w in name for w in ("wait", "work", "_wrap_tensor")):
            entry = (name.split("::")[-1], 0)  # an op this table does not know: still counted, under its name
        if entry is not None and _group_size(args, kwargs) != 1:  # a 1-rank group sends nothing
            kind, index = entry
            payload = [] if index is None else [t for t in tree_leaves(args[index]) if isinstance(t, torch.Tensor)]
            numel = sum(t.numel() for t in payload)
            self.calls.append(Collective(kind, name, numel, payload[0].dtype if payload else torch.uint8))
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        """{kind: {"calls": n, "bytes": b}} plus a "total" entry."""
        out: dict = collections.defaultdict(lambda: {"calls": 0, "bytes": 0})
        for c in self.calls:
            for key in (c.kind, "total"):
                out[key]["calls"] += 1
                out[key]["bytes"] += c.nbytes
        return dict(out)


def megatron_minimum(cfg, *, batch: int, seq: int, dtype: torch.dtype, tp: int, loss_parallel: bool,
                     sequence_parallel: bool = False) -> dict:
    """Collectives per rank per training step of Megatron TP for a Llama model (bytes: this rank's payload).

    Without sequence parallelism. Forward: the vocab-parallel embedding's all-reduce, 2 all-reduces per block
    (attention out, MLP down); backward: 2 per block (input gradients of attention and MLP) and the LM head's
    input gradient. Replicated params (norms) need nothing: their grads are equal.
    With it (Megatron-core's SP). Forward: the embedding's reduce-scatter, per block 2 all-gathers (entries) and
    2 reduce-scatters (exits), the final all-gather; backward: per block 2 reduce-scatters, 2 all-gathers and 2
    more all-gathers of the regions' inputs (kept as this rank's tokens), the embedding's all-gather, the LM
    head's reduce-scatter, and one coalesced all-reduce of the norm weights' partial gradients.
    Then, either way, the vocab-parallel loss (2 small fp32 all-reduces: the max, then sum-exp stacked with the
    target logit) or one all-gather of this rank's logits.
    """
    tokens, elem, layers = batch * seq, dtype.itemsize, cfg.num_hidden_layers
    full = tokens * cfg.hidden_size * elem
    if sequence_parallel:
        calls = {"all_gather": 2 * layers + 1 + 4 * layers + 1, "reduce_scatter": 1 + 2 * layers + 2 * layers + 1,
                 "all_reduce": 1}
        nbytes = {"all_gather": calls["all_gather"] * full // tp, "reduce_scatter": calls["reduce_scatter"] * full,
                  "all_reduce": (2 * layers + 1) * cfg.hidden_size * elem}
    else:
        big = 4 * layers + 2
        calls, nbytes = {"all_reduce": big}, {"all_reduce": big * full}
    if loss_parallel:
        calls["all_reduce"] = calls.get("all_reduce", 0) + 2
        nbytes["all_reduce"] = nbytes.get("all_reduce", 0) + 3 * tokens * 4
    else:
        vocab_local = -(-cfg.vocab_size // tp)
        calls["all_gather"] = calls.get("all_gather", 0) + 1
        nbytes["all_gather"] = nbytes.get("all_gather", 0) + tokens * vocab_local * elem
    out = {k: {"calls": calls[k], "bytes": nbytes[k]} for k in calls}
    out["total"] = {"calls": sum(calls.values()), "bytes": sum(nbytes.values())}
    return out
