"""IA3 (`peft.IA3Config`) on tp_plugin's column- and row-parallel linears.

IA3 multiplies a learned vector l into a linear layer: into its output (`y * l`, l [out, 1]) or, for the
`feedforward_modules`, into its input (`W (x * l)`, l [1, in]). Every case splits cleanly:

    column, output  (k/v_proj)   l split with the output rows; local; replicated KV rows sum l's gradient over holders
    column, input                l replicated; it scales the full input after the layer's input-gradient
                                  all-reduce, so its gradient is a partial sum: all-reduced in backward ([in], small)
    row, input      (down_proj)  l split with the input columns, scaling this rank's input before the partial product
    row, output                  l replicated, applied after the reduction (and its bias), like the bias: complete
                                  gradient (summed over the group under sequence parallelism, where it sees this
                                  rank's tokens)

Merging is PEFT's own (`weight * l`, broadcast along the matching dim, the output bias scaled too): on each rank's
shard with its slice of l, which is the slice of the unsplit merged weight. The init, broadcast and slicing follow
the LoRA layers (`layers.py`): l is created at full size by PEFT (same random draws as unsplit), broadcast from TP
rank 0, then sliced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.ia3 import layer as ia3
from torch import nn

from ...runtime.comm import broadcast_from_rank0, copy_to_tp, sum_grad_over_sharers
from ...runtime.layers import ColumnParallelLinear, RowParallelLinear, tag_param
from ...sharding import ShardSpec, shard_tensor


class TPIA3Linear(ia3.Linear):
    """What the column and row variants share: sizes, sliced init, the forward's gate. Merge is PEFT's."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, is_feedforward: bool = False,
                 **kwargs: Any) -> None:
        # PEFT's IA3Layer.__init__ reads the sizes from an nn.Linear / Conv1D only; the same attributes, set here
        # with the full (unsplit) sizes (PEFT builds l at that size, we slice it after).
        nn.Module.__init__(self)
        self.base_layer, self.ia3_l, self._disable_adapters, self.merged_adapters = base_layer, nn.ParameterDict(), \
            False, []
        self.is_feedforward = is_feedforward
        self.in_features, self.out_features = self._full_in_out(base_layer)
        self.fan_in_fan_out = base_layer.transposed  # the base layer's layout, not the config's
        self.is_target_conv_1d_layer = False         # unloading gives back the parallel layer itself
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config)

    def _full_in_out(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _spec(self) -> ShardSpec | None:
        """ShardSpec of l (None = replicated)."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config, **kwargs: Any) -> None:
        super().update_layer(adapter_name, config, **kwargs)
        base, full = self.get_base_layer(), self.ia3_l[adapter_name]
        if not full.is_meta and dist.get_world_size(base.group) > 1:
            broadcast_from_rank0([full.data], base.group)
        spec = self._spec()
        data = full.data if spec is None else shard_tensor(full.data, spec)
        self.ia3_l[adapter_name] = nn.Parameter(data, requires_grad=full.requires_grad)
        tag_param(self.ia3_l[adapter_name], spec,
                  replicas=getattr(base.weight, "tp_replicas", 1) if spec is not None else 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = [a for a in self.active_adapters if a in self.ia3_l]
        if self.disable_adapters or self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        return self._scaled(x, adapters).to(x.dtype)

    def _vector(self, adapters: list[str]) -> torch.Tensor:
        """The product of the active adapters' l, flattened (as PEFT's forward does)."""
        scale = 1
        for name in adapters:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    def _scaled(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "tp_" + super().__repr__()


class TPIA3ColumnLinear(TPIA3Linear):
    def _full_in_out(self, base: ColumnParallelLinear) -> tuple[int, int]:
        return base.weight.shape[0] if base.transposed else base.weight.shape[1], base.spec.full_size

    def _spec(self) -> ShardSpec | None:
        spec = self.get_base_layer().spec
        return None if self.is_feedforward else ShardSpec(0, spec.full_size, spec.ranges, spec.pad)

    def _scaled(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base: ColumnParallelLinear = self.get_base_layer()
        x, keep = base.enter(x)  # the layer's (or its region's) input, whose gradient is all-reduced
        if keep is None:
            return self._project(base, x, adapters)
        with keep.hooks:  # sequence parallelism: the gathered input is fetched again for backward
            return self._project(base, x, adapters)

    def _project(self, base: ColumnParallelLinear, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        scale = self._vector(adapters)
        if self.is_feedforward:  # [in], replicated: its gradient from this rank's outputs only, a partial sum
            return base._project(x * copy_to_tp(scale, base.group).to(x.dtype))
        if base.shared_rows:     # [out_local]: rows held by several ranks sum their gradients
            scale = sum_grad_over_sharers(scale, base.group, base.spec.ranges, base.spec.full_size)
        return base._project(x) * scale


class TPIA3RowLinear(TPIA3Linear):
    def _full_in_out(self, base: RowParallelLinear) -> tuple[int, int]:
        return base.spec.full_size, base.weight.shape[1] if base.transposed else base.weight.shape[0]

    def _spec(self) -> ShardSpec | None:
        spec = self.get_base_layer().spec
        return ShardSpec(1, spec.full_size, spec.ranges, spec.pad) if self.is_feedforward else None

    def _scaled(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base: RowParallelLinear = self.get_base_layer()
        scale = self._vector(adapters)
        if self.is_feedforward:  # [in_local]: this rank's input columns, before the partial product
            return base(x * scale.to(x.dtype))
        if base.sequence is not None and base.sequence.active():  # [out] on this rank's tokens: partial gradient
            scale = copy_to_tp(scale, base.group)
        return base(x) * scale


IA3_LAYERS = {ColumnParallelLinear: TPIA3ColumnLinear, RowParallelLinear: TPIA3RowLinear}


def create_ia3_module(target: nn.Module, adapter_name: str, config, *, is_feedforward: bool) -> nn.Module | None:
    """The TP IA3 layer for a parallel linear (the first dispatcher tried), else None (PEFT's own dispatch)."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    for layer_type, cls in IA3_LAYERS.items():
        if isinstance(base, layer_type):
            return cls(target, adapter_name, config, is_feedforward=is_feedforward)
    return None
