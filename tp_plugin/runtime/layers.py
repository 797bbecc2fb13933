"""Tensor-parallel layers: plain `nn.Module`s holding only this rank's shard as ordinary tensors.

They are deliberately *not* subclasses of `nn.Linear` / `nn.Embedding`: PEFT and other tools would treat
them as dense layers and compute wrong gradients without any error. Parameter names and layouts are the
ones of the module they replace (`weight`, `bias`; a GPT-2 `Conv1D` keeps its transposed `[in, out]`
weight), so a state dict of shards has the same keys and each shard is a slice of the checkpoint tensor.

Every sharded parameter is tagged the Megatron way (`tensor_model_parallel`, `partition_dim`,
`partition_stride`, which DeepSpeed reads) plus `tp_shard`, the `ShardSpec` saying which rows it holds.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from .comm import copy_to_tp, gather_from_tp, reduce_from_tp, sum_grad_over_sharers
from .copies import deepcopy_layer
from .logits import DeferredLogits
from .overlap import InputGrad, column_linear
from .regions import Region
from .sequence import SequenceParallel, gather_tokens, scatter_tokens
from ..sharding import ShardSpec, shard_tensor


def _shard_param(full: torch.Tensor, spec: ShardSpec | None, *, replicas: int = 1) -> nn.Parameter:
    """A new Parameter holding this rank's slice (or a copy of a replicated tensor when `spec` is None)."""
    data = full.detach().clone() if spec is None else shard_tensor(full.detach(), spec)
    param = nn.Parameter(data, requires_grad=full.requires_grad)
    tag_param(param, spec, replicas=replicas)
    return param


def tag_param(param: torch.Tensor, spec: ShardSpec | None, *, replicas: int = 1) -> None:
    """Megatron/DeepSpeed tags, plus `tp_replicas`: how many TP ranks hold each row (for grad norms)."""
    param.tensor_model_parallel = spec is not None
    param.model_parallel = spec is not None
    param.partition_dim = spec.dim if spec is not None else -1
    param.partition_stride = 1
    param.tp_shard = spec
    param.tp_replicas = replicas


class _ParallelLayer(nn.Module):
    """What every parallel layer shares: a deep copy stays on the same groups (`tp_plugin.runtime.copies`)."""

    __deepcopy__ = deepcopy_layer


class ColumnParallelLinear(_ParallelLayer):
    """`y = x A^T + b` with A split by output rows: no communication forward, input gradient all-reduced.

    `sync_input_grad=False` inside a region, which hands its column layers one shared synced copy of its input
    (so q, k and v of one attention cost one all-reduce in backward, not three). `shared_rows` is set for
    replicated KV heads: the weight gradient is then summed over the ranks that hold the same rows. Under
    sequence parallelism (`sequence` set and active) a layer that syncs its own input gathers the tokens instead.
    """

    sequence: SequenceParallel | None = None
    region: weakref.ref[Region] | None = None  # the enclosing region (set by the split when `sync_input_grad` is False)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ShardSpec, group: ProcessGroup,
                 *, transposed: bool = False, sync_input_grad: bool = True, shared_rows: bool = False,
                 replicas: int = 1):
        super().__init__()
        self.group, self.spec, self.transposed = group, spec, transposed
        self.sync_input_grad, self.shared_rows = sync_input_grad, shared_rows
        self.weight = _shard_param(weight, spec, replicas=replicas)
        bias_spec = ShardSpec(0, spec.full_size, spec.ranges, spec.pad)
        self.bias = None if bias is None else _shard_param(bias, bias_spec, replicas=replicas)
        if shared_rows and spec.dim != 0:
            raise NotImplementedError("replicated rows are only supported for [out, in] weights")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, keep, input_grad = self._enter(x, overlapped=True)
        if keep is None:
            return self._project(x, input_grad)
        with keep.hooks:  # a region of its own under sequence parallelism: keep only this rank's tokens
            return self._project(x, input_grad)

    def enter(self, x: torch.Tensor):
        """The input as this layer computes with it, and the saved-tensor hooks to run that under (or None).
        A layer of its own region (`sync_input_grad`): its input gradient all-reduced (under sequence
        parallelism: the tokens gathered). Inside a region (`region` set): the region's input as its column
        layers share it (one reduction for q, k and v), or, fed by another tensor computed inside the region
        (MLA's q_b_proj reads q_a_proj's output), its own input-gradient all-reduce."""
        x, keep, _ = self._enter(x, overlapped=False)
        return x, keep

    def _enter(self, x: torch.Tensor, *, overlapped: bool):
        """`enter`, plus the region call's `overlap.InputGrad` for a layer computing through `_project`."""
        if self.sync_input_grad:
            if self.sequence is not None and self.sequence.active():
                face, _, keep = gather_tokens(self.sequence, x)
                return face, keep, None
            return copy_to_tp(x, self.group), None, None
        region = self.region() if self.region is not None else None
        if region is None:  # built by hand with sync_input_grad=False: the caller syncs the input gradient
            return x, None, None
        shared, input_grad = region.columns_input(x, overlapped=overlapped)
        if shared is not None:
            return shared, None, input_grad
        return copy_to_tp(x, self.group), None, None

    def _project(self, x: torch.Tensor, input_grad: InputGrad | None = None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.shared_rows:
            weight = sum_grad_over_sharers(weight, self.group, self.spec.ranges, self.spec.full_size)
            if bias is not None:
                bias = sum_grad_over_sharers(bias, self.group, self.spec.ranges, self.spec.full_size)
        if input_grad is not None:  # the region's input gradient reduced while the weight gradient is computed
            return column_linear(x, weight, bias, input_grad, transposed=self.transposed)
        if self.transposed:  # GPT-2 Conv1D: weight is [in, out_local]
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight) if bias is not None \
                else x.reshape(-1, x.shape[-1]) @ weight
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"local_out={self.spec.local_size}, full_out={self.spec.full_size}, transposed={self.transposed}"


class RowParallelLinear(_ParallelLayer):
    """`y = x A^T + b` with A split by input columns: partial outputs all-reduced forward, nothing backward.

    The input is expected already split (the output of local heads or a column-parallel layer). The bias
    is replicated and added once, after the reduction. Under sequence parallelism the reduction is a
    reduce-scatter over the tokens (`sequence` set and active), and the bias then sees this rank's tokens only.
    """

    sequence: SequenceParallel | None = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ShardSpec, group: ProcessGroup,
                 *, transposed: bool = False):
        super().__init__()
        self.group, self.spec, self.transposed = group, spec, transposed
        self.weight = _shard_param(weight, spec)
        self.bias = None if bias is None else _shard_param(bias, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial_output(x))

    def partial_output(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contribution `x_local @ A_local^T`, [..., out], before the sum over the group."""
        if self.transposed:
            return (x.reshape(-1, x.shape[-1]) @ self.weight).view(*x.shape[:-1], self.weight.shape[1])
        return F.linear(x, self.weight)

    def reduce(self, partial: torch.Tensor, *, add_bias: bool = True) -> torch.Tensor:
        """Sum the partial outputs over the group (the one forward all-reduce), then add the bias once (unless the
        caller adds it later itself: DoRA scales the sum first)."""
        if self.sequence is not None and self.sequence.active():
            out = scatter_tokens(self.sequence, partial)
        else:
            out = reduce_from_tp(partial, self.group)
        return out if self.bias is None or not add_bias else out + self.bias

    def extra_repr(self) -> str:
        return f"local_in={self.spec.local_size}, full_in={self.spec.full_size}, transposed={self.transposed}"


class VocabParallelEmbedding(_ParallelLayer):
    """Embedding split by vocabulary rows; ids outside this rank's range look up zeros, then all-reduce.

    Keeps `padding_idx` (its row gets no gradient) and a scaled embedding's `embed_scale` (Gemma).
    """

    def __init__(self, embedding: nn.Embedding, spec: ShardSpec, group: ProcessGroup):
        super().__init__()
        unsupported = {k: getattr(embedding, k) for k in ("max_norm", "scale_grad_by_freq", "sparse")
                       if getattr(embedding, k, None)}
        if unsupported:
            raise NotImplementedError(f"VocabParallelEmbedding does not support {unsupported}")
        self.group, self.spec = group, spec
        (self.vocab_start, self.vocab_stop), = spec.ranges
        self.num_embeddings, self.embedding_dim = spec.full_size, embedding.embedding_dim
        self.weight = _shard_param(embedding.weight, spec)
        pad = embedding.padding_idx
        self.padding_idx = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_stop \
            else None
        scale = getattr(embedding, "embed_scale", None)
        if scale is not None:
            self.register_buffer("embed_scale", torch.as_tensor(scale).clone(), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, = self.lookup(ids, [self.weight])
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def lookup(self, ids: torch.Tensor, tables: list[torch.Tensor]) -> list[torch.Tensor]:
        """The rows of `ids` in each table split like the weight ([V_local, d]: the weight, a LoRA factor), zeros
        for ids outside this rank's range, summed over the TP group in one all-reduce; before `embed_scale`."""
        outside = (ids < self.vocab_start) | (ids >= self.vocab_stop)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        rows = [F.embedding(local_ids, table, self.padding_idx) for table in tables]
        local = rows[0] if len(rows) == 1 else torch.cat(rows, dim=-1)
        full = reduce_from_tp(local.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
        return [full] if len(rows) == 1 else list(full.split([t.shape[1] for t in tables], dim=-1))

    def extra_repr(self) -> str:
        return f"vocab=[{self.vocab_start}, {self.vocab_stop}) of {self.num_embeddings}, dim={self.embedding_dim}"


class VocabParallelLMHead(_ParallelLayer):
    """LM head split by vocabulary rows.

    In training its logits are `logits.DeferredLogits`: computed only when read, while the causal-LM loss is
    computed from the hidden states and this shard in token chunks (`loss.CausalLMLoss`). Read, they are the
    all-gathered full logits (padding stripped), or with `gather_output=False` (loss_parallel) this rank's
    vocabulary shard. In eval mode (evaluation, prediction, `generate`) the full logits are computed at once,
    as are the training logits when `defer_logits` is False, inside `torch.compile`, and under ZeRO-3 (which
    gathers the weight for this forward only)."""

    defer_logits = True

    def __init__(self, head: nn.Module, spec: ShardSpec, group: ProcessGroup, *, tied_weight: nn.Parameter | None,
                 gather_output: bool):
        super().__init__()
        self.group, self.spec, self.gather_output = group, spec, gather_output
        (self.vocab_start, self.vocab_stop), = spec.ranges
        self.weight = tied_weight if tied_weight is not None else _shard_param(head.weight, spec)
        # how TRL's fused LM head, which reads this weight directly, finds its vocabulary range and group
        self.weight.tp_vocab_head = weakref.ref(self)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else _shard_param(bias, ShardSpec(0, spec.full_size, spec.ranges, spec.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.defer_logits and not torch.compiler.is_compiling() \
                and not hasattr(self.weight, "ds_id"):  # ZeRO-3 holds the weight only during this forward
            return DeferredLogits.deferred(x, self)
        return self.eager_logits(x, self.weight, self.bias, gather=self.gather_output or not self.training)

    def eager_logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                     gather: bool) -> torch.Tensor:
        """The full logits (all-gathered, padding stripped), or with `gather=False` this rank's shard. Full logits
        that will get a gradient carry their shard (`tp_vocab_shard`): the loss reads it, and sends its gradient
        there instead of through a full-vocabulary one."""
        logits = F.linear(copy_to_tp(x, self.group), weight, bias)
        if not gather:
            return logits
        full = gather_from_tp(logits, self.group)[..., : self.spec.full_size]
        if full.requires_grad:
            full.tp_vocab_shard = logits
        return full

    def extra_repr(self) -> str:
        return f"vocab=[{self.vocab_start}, {self.vocab_stop}) of {self.spec.full_size}, gather={self.gather_output}"


PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead)
