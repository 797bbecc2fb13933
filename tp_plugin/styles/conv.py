"""Gated short convolutions (LFM2 / LFM3: y = C * conv(B * x)) split by channels."""

from __future__ import annotations

from torch import nn

from .base import PlanEntry, Style
from ..runtime.layers import ColumnParallelLinear, RowParallelLinear, _shard_param
from ..runtime.regions import RegionInputs
from ..sharding import ShardSpec, TPSplitError, even_ranges


def is_short_conv(module: nn.Module) -> bool:
    """in_proj -> [B | C | x] (3 x channels), a depthwise conv1d over the channels, out_proj (channels -> hidden)."""
    conv, in_proj, out_proj = (getattr(module, n, None) for n in ("conv", "in_proj", "out_proj"))
    if not (isinstance(conv, nn.Conv1d) and isinstance(in_proj, nn.Linear) and isinstance(out_proj, nn.Linear)):
        return False
    channels = conv.in_channels
    children = {name for name, child in module.named_children() if any(True for _ in child.parameters())}
    return conv.groups == conv.out_channels == channels and in_proj.out_features == 3 * channels \
        and out_proj.in_features == channels and children == {"conv", "in_proj", "out_proj"}


class ShortConvChannels(Style):
    """A gated short convolution (y = C * conv(B * x)) split by channels: each rank keeps its channels' rows of
    B, C and x in in_proj, its channels of the depthwise conv, and out_proj's matching input columns (row-parallel).
    Everything between is per channel, so the block costs Megatron's minimum."""

    region = RegionInputs(columns_only=True)

    def plan_entry(self, path, module, tp, attn):
        if not is_short_conv(module):
            raise TPSplitError(f"{path}: ShortConvChannels expects in_proj [B|C|x], a depthwise conv and out_proj, "
                               f"found {type(module).__name__}")
        c = module.conv.in_channels
        ranges = even_ranges(c, tp, what=f"{path} ({c} channels)")
        layouts = {"in_proj": lambda a, b: ((a, b), (c + a, c + b), (2 * c + a, 2 * c + b)),
                   "conv": lambda a, b: ((a, b),), "out_proj": lambda a, b: ((a, b),)}
        full, specs = {}, [{} for _ in range(tp)]
        for owner, dim in (("in_proj", 0), ("conv", 0), ("out_proj", 1)):
            for leaf in ("weight", "bias"):
                tensor = getattr(getattr(module, owner), leaf)
                if tensor is None or (owner == "out_proj" and leaf == "bias"):
                    continue  # out_proj's bias is added once, after the reduction (replicated)
                full[f"{owner}.{leaf}"] = tuple(tensor.shape)
                for rank, (a, b) in enumerate(ranges):
                    specs[rank][f"{owner}.{leaf}"] = ShardSpec(dim if leaf == "weight" else 0, tensor.shape[
                        dim if leaf == "weight" else 0], layouts[owner](a, b))
        return PlanEntry(path, self, full, specs)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        split_projections_and_conv(module, entry.specs[rank], group, "conv")
        return module


def split_projections_and_conv(module: nn.Module, specs: dict, group, conv_name: str) -> nn.Conv1d:
    """A channel mixer's common part: in_proj column-parallel (the region syncs its input), the depthwise conv's
    channels (`{conv_name}.weight` / `.bias` specs), out_proj row-parallel (its bias added once, after the sum)."""
    module.in_proj = ColumnParallelLinear(module.in_proj.weight, module.in_proj.bias, specs["in_proj.weight"],
                                          group, sync_input_grad=False)
    conv = getattr(module, conv_name)
    for leaf in ("weight", "bias"):
        if f"{conv_name}.{leaf}" in specs:
            setattr(conv, leaf, _shard_param(getattr(conv, leaf), specs[f"{conv_name}.{leaf}"]))
    conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
    module.out_proj = RowParallelLinear(module.out_proj.weight, module.out_proj.bias, specs["out_proj.weight"],
                                        group)
    return conv
