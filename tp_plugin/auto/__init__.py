"""Policies derived from the model when no one wrote one: the model's own `base_model_tp_plan` translated style
by style (`translate.py`), else a structural reading of its module tree (`structure.py`). Both keep whatever they
cannot place safely replicated (exact, only less split); `inspect` counts those entries.

May import: plan time (`policy`, `styles/`), `runtime/` and `sharding` (tests/test_layering.py).
"""

from __future__ import annotations

import logging

from torch import nn

from dataclasses import replace

from ..policy import Policy
from ..sharding import TPSplitError
from ..styles import HeadAttrs
from .common import base_prefix, modules
from .structure import structural_policy
from .translate import tp_plan_of, translate_tp_plan

logger = logging.getLogger("tp_plugin")

__all__ = ["auto_policy", "structural_policy", "translate_tp_plan"]


def auto_policy(model: nn.Module) -> Policy:
    """For a model with no registered policy: its translated `base_model_tp_plan` (completed by the structural
    rules where the plan says nothing), else the structural fallback (the reason is logged)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    try:
        policy = translate_tp_plan(model)
        reason = "it has no base_model_tp_plan" if policy is None else None
    except TPSplitError as exc:
        policy, reason = None, f"its base_model_tp_plan could not be translated ({exc})"
    if policy is not None:
        return _completed(model, policy)
    logger.info("tp_plugin: %s: structural fallback policy, because %s", model_type, reason)
    return structural_policy(model)


def _completed(model: nn.Module, translated: Policy) -> Policy:
    """`translated` plus what the structural rules split among the modules the model's tp_plan does not mention at
    all (many plans name only their MoE experts, leaving attention and dense MLPs replicated). A module the plan
    mentions, even to keep it whole, is left as the plan says; an attention is taken whole or not at all."""
    try:
        structural = structural_policy(model)
    except TPSplitError:
        return translated
    prefix = base_prefix(model)
    named = set()
    for pattern in list(tp_plan_of(model)) + list(translated.layers):  # a parameter's pattern names its module
        found = modules(model, pattern, prefix) or modules(model, pattern.rpartition(".")[0], prefix)
        named |= {path for path, _ in found}
    attentions = [path for path, style in structural.layers.items() if isinstance(style, HeadAttrs)]

    def unit(path: str) -> str:  # an attention's projections go with it
        return next((a for a in attentions if path == a or path.startswith(a + ".")), path)

    def touched(path: str) -> bool:
        return any(n == path or n.startswith(path + ".") or path.startswith(n + ".") for n in named)

    added = {path: style for path, style in structural.layers.items() if not touched(unit(path))}
    if not added:
        return translated
    if translated.attention is not None:  # the plan splits its attention: others are another kind (linear attention)
        added = {path: style for path, style in added.items() if unit(path) not in attentions}
    heads = any(unit(path) in attentions for path in added)
    # partial gradients (per-head norms, activation scalars) of what is added: inside an added attention, or beside
    # an added projection in its MLP
    owners = {unit(path) if unit(path) in attentions else path.rpartition(".")[0] for path in added}
    partial = [p for p in structural.partial_grad
               if any(path.startswith(owner + ".") for path, _ in modules(model, p, prefix) for owner in owners)]
    return replace(translated, name=translated.name.replace("translated tp_plan", "translated tp_plan + structure"),
                   layers={**translated.layers, **added},
                   attention=translated.attention or (structural.attention if heads else None),
                   partial_grad=tuple(dict.fromkeys(translated.partial_grad + tuple(partial))))
