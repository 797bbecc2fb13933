"""The input embedding and the LM head, split by vocabulary (padded to a multiple of tp)."""

from __future__ import annotations

from .base import Layout, PlanEntry, Style
from ..runtime.layers import VocabParallelEmbedding, VocabParallelLMHead
from ..sharding import vocab_specs


def _vocab_entry(path, module, style, tp) -> PlanEntry:
    specs = vocab_specs(module.weight.shape[0], tp)
    full = {"weight": tuple(module.weight.shape)}
    per_rank = [{"weight": s} for s in specs]
    if getattr(module, "bias", None) is not None:
        full["bias"] = tuple(module.bias.shape)
        for rank, spec in enumerate(specs):
            per_rank[rank]["bias"] = spec
    return PlanEntry(path, style, full, per_rank)


class VocabEmbedding(Style):
    """Rows split by vocabulary; ids outside a rank's range look up zeros, then one all-reduce."""

    def plan_entry(self, path, module, tp, attn):
        return _vocab_entry(path, module, self, tp)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        return VocabParallelEmbedding(module, entry.specs[rank]["weight"], group)


class VocabLMHead(Style):
    """Rows split by vocabulary; full logits all-gathered, or (loss_parallel) left as this rank's shard."""

    output_layout = Layout.REPLICATED  # SHARD_HIDDEN with loss_parallel (the vocabulary is the last dim)

    def plan_entry(self, path, module, tp, attn):
        return _vocab_entry(path, module, self, tp)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        return VocabParallelLMHead(module, entry.specs[rank]["weight"], group, tied_weight=tied_weight,
                                   gather_output=not loss_parallel)
