"""The one contract every style follows, and the two families most styles belong to.

A style is a small object (its `repr` is what `inspect` prints). `plan_entry` resolves it against one module
(pure: runs on every rank before any collective, so a misfit is an error everywhere); `build` turns the entry
into the module that replaces it (or patches it in place and returns it). The entry records the style and its
activation layouts, so later machinery (sequence parallelism, overlap) reads the layouts, never a string.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..entry import AttentionPlan, Layout, PlanEntry
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..sharding import ShardSpec, TPSplitError


class Style:
    input_layout: Layout = Layout.REPLICATED
    output_layout: Layout = Layout.REPLICATED
    region = None  # a `regions.RegionInputs` when the built module is itself a region (MoE experts)

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
