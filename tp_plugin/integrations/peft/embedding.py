"""LoRA on tp_plugin's vocabulary-parallel embedding (registered with PEFT's custom-module hook).

PEFT's LoRA embedding adds `embedding(ids, A^T) @ B^T * scaling` (A [r, V], B [H, r]). The base weight is split by
vocabulary rows, so A is split the same way, by its vocabulary *columns*, and B is replicated:

    base   out_local   = lookup(ids, W_local)    zeros for ids outside this rank's range  [..., H]
    LoRA   after_local = lookup(ids, A_local^T)  zeros likewise                           [..., r]

Both are partial sums over the TP group (exactly one rank holds each id), so they travel in the one all-reduce the
base embedding does anyway, side by side ([..., H + r]): no extra collective, r more numbers per token. After it
every rank holds the full `after` and computes `after @ B^T` itself, so B's gradient is complete and identical on
every rank with no backward collective, and A's rows get their gradient from the (replicated) output gradient.

Merging adds `(B A_local)^T * scaling` to the local weight rows (PEFT's own merge); the padding columns of A are
zero, so the padding rows stay zero. The LM head tied to the embedding shares its weight, so merging changes it as
in plain PEFT. DoRA on the embedding is refused by the config check (see `checks.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.lora import layer as lora
from torch import nn

from ...runtime.comm import broadcast_from_rank0
from ...runtime.layers import VocabParallelEmbedding, tag_param
from ...sharding import ShardSpec, TPSplitError, shard_tensor


class TPLoraEmbedding(lora.Embedding):
    """LoRA on a `VocabParallelEmbedding`: A split by vocabulary columns like the base rows, B replicated."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        """The full vocabulary: PEFT builds A at this size (same random draws as unsplit), we slice it after."""
        return module.num_embeddings, module.embedding_dim

    @property
    def lora_variants(self):
        return {(): None}  # no DoRA here (refused with a message before PEFT gets here)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        self._shard_adapter(adapter_name)

    def _shard_adapter(self, adapter_name: str) -> None:
        base: VocabParallelEmbedding = self.get_base_layer()
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        if not (a.is_meta or b.is_meta) and dist.get_world_size(base.group) > 1:
            broadcast_from_rank0([a.data, b.data], base.group)  # every rank: TP rank 0's full factors
        spec = base.spec
        columns = ShardSpec(1, spec.full_size, spec.ranges, spec.pad)
        self.lora_embedding_A[adapter_name] = nn.Parameter(shard_tensor(a.data, columns), requires_grad=a.requires_grad)
        tag_param(self.lora_embedding_A[adapter_name], columns)
        tag_param(self.lora_embedding_B[adapter_name], None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise TPSplitError("unsupported: mixed-adapter batches (adapter_names=...) on the tensor-parallel "
                               "TPLoraEmbedding; activate one set of adapters with set_adapter()")
        base: VocabParallelEmbedding = self.get_base_layer()
        adapters = [a for a in self.active_adapters if a in self.lora_embedding_A]
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged or not adapters:
            return base(x, *args, **kwargs)
        tables = [base.weight] + [self.lora_embedding_A[name].T for name in adapters]   # [V_local, H], [V_local, r]
        out, *afters = base.lookup(x, tables)                       # the LoRA lookups ride on the base all-reduce
        for name, after in zip(adapters, afters):
            out = out + (after @ self.lora_embedding_B[name].T) * self.scaling[name]
        return out if base.embed_scale is None else out * base.embed_scale.to(out.dtype)

    def __repr__(self) -> str:
        return "tp_" + super().__repr__()


LORA_EMBEDDINGS = {VocabParallelEmbedding: TPLoraEmbedding}
