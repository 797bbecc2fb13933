"""LoRA layers for tp_plugin's column- and row-parallel linears (registered with PEFT's custom-module hook).

Both subclass PEFT's own `lora.Linear`, so merge/unmerge/get_delta_weight, scaling, rslora, lora_bias and
adapter bookkeeping are PEFT's; only the shapes of the factors and the forward's collectives differ:

    column-parallel base  W[out_local, in]:  A [r, in] replicated,       B [out_local, r] split like W's rows
    row-parallel base     W[out, in_local]:  A [r, in_local] split like W's columns, B [out, r] replicated

A GPT-2 `Conv1D` base (`transposed=True`, weight [in, out]) has the same factor shapes; only the merged delta
is transposed (PEFT's `fan_in_fan_out`).

DoRA (`use_dora=True`, see `dora.py`) adds the magnitude vector m: split with the rows on a column-parallel base,
replicated on a row-parallel one (its weight norm then summed over the TP group).

Initialisation: the factors are first created at their *full* size with PEFT's own init (so a given RNG state
gives the adapter an unsplit model would get), broadcast from TP rank 0, and then sliced. Replicated factors are
therefore identical across the TP group, and every replicated factor's gradient is made complete (summed over
the group) inside the forward, so it stays identical after every optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft.tuners.lora import layer as lora
from torch import nn

from ...runtime.comm import broadcast_from_rank0, copy_to_tp, sum_grad_over_sharers
from ...runtime.layers import ColumnParallelLinear, RowParallelLinear, tag_param
from ...sharding import ShardSpec, TPSplitError, shard_tensor
from . import dora


class TPLoraLinear(lora.Linear):
    """What the column and row variants share: sharded init and the forward gate. (Loading an ordinary adapter is
    sliced for each rank by the split model's own state-dict hooks, `tp_plugin.state_dicts`.)"""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)
        # PEFT reads fan_in_fan_out from the config; ours follows the base layer's own layout instead.
        self.fan_in_fan_out = self.get_base_layer().transposed

    # --- shapes -------------------------------------------------------------------------------------------------
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        """The *full* (unsplit) sizes: PEFT builds the factors at these sizes, we slice them afterwards."""
        raise NotImplementedError

    def _factor_specs(self) -> dict[str, ShardSpec | None]:
        """ShardSpec of `A.weight`, `B.weight`, `B.bias` (None = replicated)."""
        raise NotImplementedError

    @property
    def lora_variants(self):
        """DoRA is the one LoRA variant with TP layers (the config check refuses the others first)."""
        return {(): None, ("use_dora",): dora.TPDoraVariant}

    # --- adapters -----------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        self._shard_adapter(adapter_name)
        if adapter_name in self.lora_variant:  # DoRA: its magnitude comes from the sliced factors
            self.lora_variant[adapter_name].init_split(self, adapter_name, row=isinstance(self, TPLoraRowLinear))
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)  # m trainable iff active

    def _shard_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        factors = {"A.weight": self.lora_A[adapter_name].weight, "B.weight": self.lora_B[adapter_name].weight}
        if self.lora_B[adapter_name].bias is not None:
            factors["B.bias"] = self.lora_B[adapter_name].bias
        if not any(p.is_meta for p in factors.values()) and dist.get_world_size(base.group) > 1:
            # One broadcast per layer: every rank then holds TP rank 0's full factors, whatever its RNG did.
            broadcast_from_rank0([p.data for p in factors.values()], base.group)
        specs = self._factor_specs()
        replicas = getattr(base.weight, "tp_replicas", 1)
        for key, full in factors.items():
            module = (self.lora_A if key[0] == "A" else self.lora_B)[adapter_name]
            spec = specs[key]
            data = full.data if spec is None else shard_tensor(full.data, spec)
            attr = key.split(".")[1]
            setattr(module, attr, nn.Parameter(data, requires_grad=full.requires_grad))
            # Tag what got registered: under PEFT's init_empty_weights, registration rebuilds the Parameter.
            tag_param(getattr(module, attr), spec, replicas=replicas if spec is not None else 1)
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        a.in_features, b.out_features = a.weight.shape[1], b.weight.shape[0]

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise TPSplitError(f"unsupported: mixed-adapter batches (adapter_names=...) on the tensor-parallel "
                               f"{type(self).__name__}; activate one set of adapters with set_adapter()")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_with_adapters(x, adapters)

    def _forward_with_adapters(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "tp_lora." + super().__repr__().removeprefix("lora.")


class TPLoraColumnLinear(TPLoraLinear):
    """LoRA on a `ColumnParallelLinear`: A replicated, B split by output rows like the base weight.

    A reads the input as the base layer enters it (`ColumnParallelLinear.enter`: its own input-gradient
    all-reduce, the tokens gathered under sequence parallelism, or the enclosing region's input), so the one
    input-gradient reduction there covers the base's and A's contributions together. The gradient reaching A's
    weight, `(B_local^T g_local)^T x`, is a partial sum over the TP ranks: it is all-reduced ([r, in], small).
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        in_features = module.weight.shape[0] if module.transposed else module.weight.shape[1]
        return in_features, module.spec.full_size

    def _factor_specs(self) -> dict[str, ShardSpec | None]:
        spec = self.get_base_layer().spec
        rows = ShardSpec(0, spec.full_size, spec.ranges, spec.pad)
        return {"A.weight": None, "B.weight": rows, "B.bias": rows}

    def _forward_with_adapters(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base: ColumnParallelLinear = self.get_base_layer()
        x, keep = base.enter(x)
        if keep is None:
            return self._adapted(base, x, adapters)
        with keep.hooks:  # sequence parallelism: what backward needs of the gathered input is fetched again
            return self._adapted(base, x, adapters)

    def _adapted(self, base, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        result = base._project(x)
        result_dtype = result.dtype
        for name in adapters:
            if name in self.lora_variant:  # DoRA, adapters applied one after the other as PEFT does
                result = dora.column_forward(self, name, x, result)
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xa = self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))
            h = F.linear(xa, copy_to_tp(lora_a.weight, base.group))        # weight grad all-reduced
            weight, bias = lora_b.weight, lora_b.bias
            if base.shared_rows:  # replicated KV heads: rows held by several ranks sum their gradients
                spec = base.spec
                weight = sum_grad_over_sharers(weight, base.group, spec.ranges, spec.full_size)
                if bias is not None:
                    bias = sum_grad_over_sharers(bias, base.group, spec.ranges, spec.full_size)
            result = result + F.linear(h, weight, bias) * self.scaling[name]   # [..., out_local]
        return result.to(result_dtype)


class TPLoraRowLinear(TPLoraLinear):
    """LoRA on a `RowParallelLinear`: A split by input columns like the base weight, B replicated.

    The LoRA partial product `B (A_local x_local)` is added to the base's partial output *before* the one
    all-reduce the base layer needs anyway, so LoRA adds no forward collective. B sees a partial input, so its
    gradient is a partial sum: it is all-reduced in backward (B is [out, r], small). Biases (the base's and a
    `lora_bias`) are replicated and added once, after the reduction (under sequence parallelism, to this rank's
    tokens: their gradients are summed over the group).
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        out_features = module.weight.shape[1] if module.transposed else module.weight.shape[0]
        return module.spec.full_size, out_features

    def _factor_specs(self) -> dict[str, ShardSpec | None]:
        spec = self.get_base_layer().spec
        return {"A.weight": ShardSpec(1, spec.full_size, spec.ranges, spec.pad), "B.weight": None, "B.bias": None}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        if config.lora_dropout > 0.0:
            self.lora_dropout[adapter_name] = ShardedInputDropout(config.lora_dropout, self.get_base_layer().spec)

    def _forward_with_adapters(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base: RowParallelLinear = self.get_base_layer()
        if any(name in self.lora_variant for name in adapters):
            if len(adapters) > 1:
                raise TPSplitError(f"unsupported: {len(adapters)} active adapters {adapters} with DoRA on the "
                                   f"tensor-parallel row layer ({base.extra_repr()}); activate one at a time")
            return dora.row_forward(self, adapters[0], x)
        partial = base.partial_output(x)                                     # [..., out], partial over ranks
        result_dtype = partial.dtype
        lora_bias = None
        for name in adapters:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xa = self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))
            scaling = self.scaling[name]
            partial = partial + F.linear(lora_a(xa), copy_to_tp(lora_b.weight, base.group)) * scaling
            if lora_b.bias is not None:
                # added after the reduction; under sequence parallelism to this rank's tokens only, so its
                # gradient is a partial sum (backward all-reduce)
                tokens_only = base.sequence is not None and base.sequence.active()
                b = (copy_to_tp(lora_b.bias, base.group) if tokens_only else lora_b.bias) * scaling
                lora_bias = b if lora_bias is None else lora_bias + b
        out = base.reduce(partial)  # the LoRA terms ride on the base layer's one all-reduce
        if lora_bias is not None:
            out = out + lora_bias
        return out.to(result_dtype)


class ShardedInputDropout(nn.Dropout):
    """Dropout on a row-parallel layer's split input that draws the mask an unsplit layer would.

    It draws the full-width mask (same RNG state on every TP rank, so the same mask) and keeps this rank's
    columns. Every rank thus consumes the same random numbers, the RNG stays in step across the TP group for
    later dropout on replicated activations, and a seeded run drops exactly what the unsplit model drops.
    """

    def __init__(self, p: float, spec: ShardSpec):
        super().__init__(p)
        self.ranges, self.full_size, self.pad = spec.ranges, spec.full_size, spec.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = F.dropout(x.new_ones(*x.shape[:-1], self.full_size), self.p, True)   # 0 or 1/(1-p)
        pieces = [mask[..., a:b] for a, b in self.ranges]
        if self.pad:
            pieces.append(mask.new_ones(*x.shape[:-1], self.pad))
        return x * torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        return f"p={self.p}, columns={list(self.ranges)} of {self.full_size}"


LORA_LAYERS = {ColumnParallelLinear: TPLoraColumnLinear, RowParallelLinear: TPLoraRowLinear}
