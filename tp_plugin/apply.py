"""Putting entries into a model: swap each planned module for its parallel layer, and split the vocabulary
again after a resize. Shared by the split (`split.py`) and the split model's HF methods (`hf_methods.py`)."""

from __future__ import annotations

import math

from torch import nn

from .styles.base import PlanEntry
from .runtime.loss import CausalLMLoss
from .plan import vocab_entries
from .state import TPState
from .styles import VocabEmbedding, VocabLMHead


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _retie(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Point every other module that shared `old` (a tied parameter) at its replacement `new`."""
    for owner in model.modules():
        for pname, param in list(owner._parameters.items()):
            if param is old:
                owner._parameters[pname] = new


def _share_embedding(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Another embedding module holding the same weight (ProphetNet's wrapper keeps its own `word_embeddings`) is
    replaced by the vocab-parallel one, so no module is left computing with the whole, now stale, weight."""
    for path, module in list(model.named_modules()):
        if module is not old and isinstance(module, nn.Embedding) and module.weight is old.weight:
            parent, name = _parent(model, path)
            setattr(parent, name, new)


def install_layers(model: nn.Module, entries: list[PlanEntry], rank: int, group, *, loss_parallel: bool) -> None:
    """Swap each entry's module for its parallel layer (the LM head after the embedding it may be tied to)."""
    embed_weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed_weight
    new_embed = None
    for entry in entries:
        parent, name = _parent(model, entry.path)
        module = getattr(parent, name)
        layer = entry.style.build(entry, module, rank, group, loss_parallel=loss_parallel,
                                  tied_weight=new_embed.weight if tied and new_embed else None)
        if isinstance(entry.style, VocabEmbedding):
            new_embed = layer
            _share_embedding(model, module, layer)
        setattr(parent, name, layer)
        is_head = isinstance(entry.style, VocabLMHead)
        if is_head and getattr(module, "bias", None) is not None:
            _retie(model, module.bias, layer.bias)  # BERT-style heads share their bias with `predictions.bias`
        if is_head:
            _install_loss(model, layer, loss_parallel=loss_parallel)


def _install_loss(model: nn.Module, head, *, loss_parallel: bool) -> None:
    """The loss that reads the split head's deferred logits or shards (`runtime.loss.CausalLMLoss`), for
    transformers' causal-LM loss. Other losses are left as they are: the logits they read are computed then."""
    if not hasattr(model, "loss_function"):
        return
    own = getattr(model.loss_function, "fallback", None) or model.loss_function  # again after a resize
    from transformers.loss.loss_utils import ForCausalLMLoss

    if own is not ForCausalLMLoss and not loss_parallel:
        return
    model.loss_function = CausalLMLoss(head, own)


def split_vocab(model: nn.Module, state: TPState, *, embed_scale=None) -> None:
    """Split the (whole, e.g. just resized) input embedding and LM head again by vocabulary; update the plan."""
    plan, mesh = state.plan, state.mesh
    old = [e for e in plan.entries if isinstance(e.style, (VocabEmbedding, VocabLMHead))]
    new = vocab_entries(model, plan.tp_size)
    body = [e for e in plan.entries if e not in old]
    plan.entries = new[:1] + body + new[1:]
    for before, after in zip(old, new):  # parameter counts follow the new vocabulary size
        delta_full = math.prod(after.full_shapes["weight"]) - math.prod(before.full_shapes["weight"])
        tied_head = isinstance(after.style, VocabLMHead) and plan.tied_embeddings
        plan.num_parameters += 0 if tied_head else delta_full
        for r in range(plan.tp_size):
            delta = math.prod(after.local_shape(r, "weight")) - math.prod(before.local_shape(r, "weight"))
            plan.rank_parameters[r] += 0 if tied_head else delta
    install_layers(model, new, mesh.tp_rank, mesh.tp_group, loss_parallel=state.loss_parallel)
    if embed_scale is not None:
        model.get_input_embeddings().embed_scale = embed_scale
