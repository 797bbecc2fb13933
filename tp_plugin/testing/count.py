"""How many collectives one forward and backward of a split model issues, against the Megatron minimum.

Megatron's minimum for a tensor-parallel sub-block (an attention, an MLP, a block of experts, a Mamba mixer): one
reduction of its output in forward (its row-parallel exit) and one of its input gradient in backward (its entry),
whatever the number of column-parallel projections inside. Plus the vocabulary: the embedding's all-reduce in
forward; the LM head's gather of the logits in forward, or, when the logits stay deferred and the loss is fused
with the head, that loss's two all-reduces (max, then the stacked sums); the head's input-gradient all-reduce in
backward. A column-parallel layer outside any
region reduces its own input gradient (one more per projection); other mechanisms add collectives the model's
layout makes necessary (a norm over split heads, replicated KV heads or Mamba groups, per-head norms' gradients);
`summary()` reports the counts and which of those the plan holds.
"""

from __future__ import annotations

import collections
import contextlib

from torch import nn

from ..runtime.logits import DeferredLogits
from ..runtime.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead
from ..state import tp_state
from .collectives import CollectiveCounter


class CollectiveCount:
    def __init__(self, model: nn.Module):
        self.model = model
        self.counter = CollectiveCounter()
        self.forward: collections.Counter | None = None
        self.exits = 0  # row-parallel exits (and reducing regions) that ran
        self.standalone = 0  # column-parallel layers that reduced their own input gradient
        self.deferred_logits = False  # the head's logits stayed deferred: the loss was fused with the head

    def forward_done(self) -> None:
        self.forward = collections.Counter(self.counter.counts)

    def summary(self) -> dict:
        fwd = sum(self.forward.values())
        bwd = sum(self.counter.counts.values()) - fwd
        plan = tp_state(self.model).plan
        split_embed = isinstance(self.model.get_input_embeddings(), VocabParallelEmbedding)
        split_head = isinstance(self.model.get_output_embeddings(), VocabParallelLMHead)
        vocab_fwd = split_embed + split_head * (2 if self.deferred_logits else 1)
        vocab_bwd = int(split_head)
        return {"fwd": fwd, "bwd": bwd, "min_fwd": self.exits + vocab_fwd, "min_bwd": self.exits + vocab_bwd,
                "standalone_columns": self.standalone, "reasons": _reasons(plan)}


def _reasons(plan) -> list[str]:
    """What in the plan adds collectives beyond the minimum (each needed by the model's layout), as its styles
    declare it (`Style.extra_collectives`, `Style.shared_rows_collectives`)."""
    reasons = []
    for entry in plan.entries:
        for reason in (entry.style.extra_collectives, entry.style.shared_rows_collectives if entry.shared_rows else None):
            if reason and reason not in reasons:
                reasons.append(reason)
    if plan.partial_grad:
        reasons.append("norms inside split regions (gradients summed)")
    return reasons


@contextlib.contextmanager
def count_collectives(model: nn.Module):
    """Count the collectives of what runs inside (call `forward_done()` between forward and backward). The split
    model's input check (one all-gather at a training run's or an evaluation's first forward, not per block) is
    off for the duration: the count is the model's own."""
    count = CollectiveCount(model)
    checks = getattr(model, "tp_plugin_input_checks", None)
    enabled = checks.enabled if checks is not None else None
    handles = []
    reducing = {e.path for e in tp_state(model).plan.entries if getattr(e.style.region, "reduce_output", False)}

    def exit_hook(module, args, output):
        count.exits += 1

    def column_hook(module, args, output):
        count.standalone += module.sync_input_grad

    def head_hook(module, args, output):
        count.deferred_logits = isinstance(output, DeferredLogits)

    for path, module in model.named_modules():
        if isinstance(module, RowParallelLinear) or path in reducing:
            handles.append(module.register_forward_hook(exit_hook))
        elif isinstance(module, ColumnParallelLinear):
            handles.append(module.register_forward_hook(column_hook))
        elif isinstance(module, VocabParallelLMHead):
            handles.append(module.register_forward_hook(head_hook))
    try:
        if checks is not None:
            checks.enabled = False
        with count.counter:
            yield count
    finally:
        if checks is not None:
            checks.enabled = enabled
        for handle in handles:
            handle.remove()
