"""`LoraConfig(trainable_token_indices=...)` (PEFT's TrainableTokens) on the vocabulary-parallel embedding and LM head.

PEFT keeps new values for a few token rows (`trainable_tokens_delta` [n, H], in the order of `token_indices`) and
writes them over the base weight's rows in the forward (`index_copy`); with tied weights the LM head's wrapper
shares the embedding's values. On a split model the weight's rows are split by vocabulary, so:

* the values stay replicated [n, H] (the saved adapter is PEFT's own, unsplit format, nothing to gather or slice);
* each rank writes the rows of its vocabulary range into its shard (a token outside it is another rank's);
* only the owner of a row computes its gradient, the others contribute zeros: the gradient is summed over the TP
  group (one all-reduce of [n, H] per use in backward), so every rank holds the complete gradient and applies the
  same update: the values stay identical across the group;
* the originals (for unmerge) are read from their owners once, with one all-reduce of [n, H] at creation.

The forward is the base layer's own (`VocabParallelEmbedding`: masked local lookup, one all-reduce;
`VocabParallelLMHead`: local logits, all-gathered), run by `torch.func.functional_call` on the shard with the rows
written (PEFT's layer calls `F.embedding` / `F.linear` on the full weight instead).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from ...runtime.comm import all_reduce, broadcast_from_rank0, copy_to_tp
from ...runtime.layers import VocabParallelEmbedding, VocabParallelLMHead, tag_param

VOCAB_LAYERS = (VocabParallelEmbedding, VocabParallelLMHead)


class TPTrainableTokensLayer(TrainableTokensLayer):
    """PEFT's TrainableTokensLayer on a vocabulary-split embedding or LM head (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, tied_adapter=None, **kwargs) -> None:
        with warnings.catch_warnings():  # PEFT's size probe warns about any layer type it does not know
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, config, tied_adapter, **kwargs)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.spec.full_size, base.weight.shape[1]

    def update_layer(self, adapter_name, config=None, tied_adapter: Optional[nn.Module] = None, **kwargs):
        if tied_adapter is not None:  # it follows the adapter it is tied to (as in PEFT)
            return
        base = self.get_base_layer()
        indices = config.token_indices if config is not None else kwargs["token_indices"]
        init_weights = config.init_weights if config is not None else kwargs.get("init_weights", True)
        self.token_indices[adapter_name] = indices
        positions, rows = _local_rows(base, indices)
        originals = base.weight.new_zeros(len(indices), base.weight.shape[1])          # [n, H]
        originals[positions] = base.weight.detach()[rows]
        if dist.get_world_size(base.group) > 1:
            originals = all_reduce(originals, base.group)  # each row from its owner, zeros from the others
        if init_weights:
            values = originals.clone()
        else:  # the unsplit layer's one draw (same RNG use), made identical on every rank
            values = torch.randn(originals.shape, dtype=originals.dtype, device=originals.device)
            if dist.get_world_size(base.group) > 1:
                broadcast_from_rank0([values], base.group)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals.detach().clone()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        tag_param(self.trainable_tokens_delta[adapter_name], None)  # replicated

    def get_merged_weights(self, active_adapters) -> torch.Tensor:
        """This rank's weight shard with the rows of its vocabulary range replaced."""
        base = self.get_base_layer()
        weight = base.weight
        for name in active_adapters:
            positions, rows = _local_rows(base, self.token_indices[name], weight.device)
            values = copy_to_tp(self.trainable_tokens_delta[name], base.group)   # backward: the owners' rows summed
            weight = weight.index_copy(0, rows, values[positions].to(weight))
        return weight

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_overlapping_tokens(adapter_names)
        base = self.get_base_layer()
        merged = base.weight.data
        for name in adapter_names:
            positions, rows = _local_rows(base, self.token_indices[name], merged.device)
            merged = merged.index_copy(0, rows, self.trainable_tokens_delta[name].data[positions].to(merged))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        base.weight.data = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            positions, rows = _local_rows(base, self.token_indices[name], base.weight.device)
            originals = self.trainable_tokens_original[name][positions].to(base.weight)
            base.weight.data.index_copy_(0, rows, originals)

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or not active_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        # the base layer's own forward (its collectives, masks, scale, gathered logits) on the written shard
        return functional_call(base, {"weight": self.get_merged_weights(active_adapters)}, (x, *args), kwargs)

    def __repr__(self) -> str:
        return "tp_" + super().__repr__()


def _local_rows(base: nn.Module, indices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in `indices` of the tokens in this rank's vocabulary range, their rows in the local shard)."""
    ids = torch.as_tensor(indices, dtype=torch.long, device=device if device is not None else base.weight.device)
    mine = (ids >= base.vocab_start) & (ids < base.vocab_stop)
    return mine.nonzero().flatten(), ids[mine] - base.vocab_start


def make_token_adapter(original_module: nn.Module, adapter_name: str, token_indices, tied_adapter):
    """The token adapter `TrainableTokensWrapper.init_modules` builds: the TP one for a vocabulary-split layer."""
    if isinstance(original_module, VOCAB_LAYERS):
        return TPTrainableTokensLayer(original_module, adapter_name, token_indices, tied_adapter)
    return None
