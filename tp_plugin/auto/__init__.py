"""Policies derived from the model when no one wrote one: the model's own `base_model_tp_plan` translated style
by style (`translate.py`), else a structural reading of its module tree (`structure.py`). Both keep whatever they
cannot place safely replicated (exact, only less split); `inspect` counts those entries."""

from __future__ import annotations

import logging

from torch import nn

from ..policy import Policy
from ..sharding import TPSplitError
from .structure import structural_policy
from .translate import translate_tp_plan

logger = logging.getLogger("tp_plugin")

__all__ = ["auto_policy", "structural_policy", "translate_tp_plan"]


def auto_policy(model: nn.Module) -> Policy:
    """For a model with no registered policy: its translated `base_model_tp_plan`, else the structural fallback
    (the reason is logged)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    try:
        policy = translate_tp_plan(model)
        reason = "it has no base_model_tp_plan" if policy is None else None
    except TPSplitError as exc:
        policy, reason = None, f"its base_model_tp_plan could not be translated ({exc})"
    if policy is not None:
        return policy
    logger.info("tp_plugin: %s: structural fallback policy, because %s", model_type, reason)
    return structural_policy(model)
