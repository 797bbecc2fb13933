"""The one contract every style follows, and the two families most styles belong to.

A style is a small object (its `repr` is what `inspect` prints). `plan_entry` resolves it against one module
(pure: runs on every rank before any collective, so a misfit is an error everywhere); `build` turns the entry
into the module that replaces it (or patches it in place and returns it). The entry records the style and its
activation layouts, so later machinery (sequence parallelism, overlap) reads the layouts, never a string.
The entry's type (`PlanEntry`, with `Layout` and `AttentionPlan`) lives here with the contract that makes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..runtime.layers import ColumnParallelLinear, RowParallelLinear
from ..sharding import HeadShard, ShardSpec, TPSplitError


# ---- what a style resolves a module into: its plan entry ----------------------------------------------------

class Layout(enum.Enum):
    """How an activation is laid out over the TP group at a module's input or output."""

    REPLICATED = "replicated"  # every rank holds the whole tensor
    SHARD_HIDDEN = "sharded on hidden"  # each rank holds its slice of the last (feature / head) dim
    SHARD_SEQUENCE = "sharded on sequence"  # each rank holds its slice of the tokens (sequence parallelism)


@dataclass
class PlanEntry:
    path: str
    style: Style
    full_shapes: dict[str, tuple[int, ...]]
    specs: list[dict[str, ShardSpec | None]]  # per TP rank: tensor name -> spec (None: replicated)
    transposed: bool = False  # a GPT-2 Conv1D weight, [in, out]
    shared_rows: bool = False  # replicated KV heads: gradient summed over the ranks holding them
    sync_input_grad: bool = True  # False inside a region, which syncs its input gradient once
    resolved: dict = field(default_factory=dict)  # what the style worked out at plan time for `build`

    @property
    def input_layout(self) -> Layout:
        return self.style.input_layout

    @property
    def output_layout(self) -> Layout:
        return self.style.output_layout

    def local_shape(self, rank: int, name: str) -> tuple[int, ...]:
        shape, spec = list(self.full_shapes[name]), self.specs[rank][name]
        if spec is not None:
            shape[spec.dim] = spec.local_size
        return tuple(shape)


@dataclass
class AttentionPlan:
    paths: list[str]  # the attention modules whose head counts are patched (none when HeadAttrs entries do it)
    heads: list[HeadShard]
    head_dim: int
    local_dims: tuple[str, ...]
    num_heads: int
    num_kv_heads: int


# ---- the contract ---------------------------------------------------------------------------------------------



class Style:
    input_layout: Layout = Layout.REPLICATED
    output_layout: Layout = Layout.REPLICATED
    region = None  # a `regions.RegionInputs` when the built module is itself a region (MoE experts)
    # Collectives this style adds beyond Megatron's minimum, and why (None: none); `testing/count.py` reports them.
    extra_collectives: str | None = None
    # ... and those its entries add when they hold rows shared with other ranks (`PlanEntry.shared_rows`)
    shared_rows_collectives: str = "replicated KV heads (their gradients summed)"

    def plan_entry(self, path: str, module: nn.Module, tp: int, attn: AttentionPlan | None) -> PlanEntry:
        raise NotImplementedError

    def build(self, entry: PlanEntry, module: nn.Module, rank: int, group, *, tied_weight=None,
              loss_parallel: bool = False) -> nn.Module:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ColumnStyle(Style):
    """Splits a linear's output features: replicated input, output sharded on hidden (a `ColumnParallelLinear`)."""

    output_layout = Layout.SHARD_HIDDEN

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        spec = entry.specs[rank]["weight"]
        replicas = entry.specs.count(entry.specs[rank]) if entry.shared_rows else 1
        return ColumnParallelLinear(module.weight, getattr(module, "bias", None), spec, group,
                                    transposed=entry.transposed, sync_input_grad=entry.sync_input_grad,
                                    shared_rows=entry.shared_rows, replicas=replicas)


class RowStyle(Style):
    """Splits a linear's input features: input sharded on hidden, output all-reduced (a `RowParallelLinear`)."""

    input_layout = Layout.SHARD_HIDDEN

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        return RowParallelLinear(module.weight, getattr(module, "bias", None), entry.specs[rank]["weight"], group,
                                 transposed=entry.transposed)


def is_dense(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def dims(module: nn.Module) -> tuple[int, int, int, int]:
    """(out_features, in_features, out_dim, in_dim) of a Linear or a transposed GPT-2 Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0], 1, 0
    return module.weight.shape[0], module.weight.shape[1], 0, 1


def linear_entry(path: str, module: nn.Module, style: Style, specs: list[ShardSpec], *,
                 shared: bool = False) -> PlanEntry:
    """The entry of a Linear / Conv1D split with `specs` (a column style splits its bias too)."""
    if not is_dense(module):
        raise TPSplitError(f"{path}: expected nn.Linear or Conv1D for {style!r}, found {type(module).__name__}")
    full = {"weight": tuple(module.weight.shape)}
    per_rank = [{"weight": s} for s in specs]
    if module.bias is not None:
        full["bias"] = tuple(module.bias.shape)
        for rank, spec in enumerate(specs):
            column = isinstance(style, ColumnStyle)
            per_rank[rank]["bias"] = ShardSpec(0, spec.full_size, spec.ranges, spec.pad) if column else None
    return PlanEntry(path, style, full, per_rank, transposed=isinstance(module, Conv1D), shared_rows=shared)


def need_heads(path: str, style: Style, attn: AttentionPlan | None) -> None:
    if attn is None:
        raise TPSplitError(f"{path}: style {style!r} splits by heads but the policy declares no attention")


def per_head(path: str, size: int, heads: int) -> int:
    if size % heads:
        raise TPSplitError(f"{path}: {size} features are not a multiple of {heads} heads; the policy does not fit")
    return size // heads
