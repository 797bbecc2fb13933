"""What a split model carries (`model.tp_plugin_state`), and the one accessor that finds it behind wrappers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .mesh import TPMesh
from .plan import Plan
from .sequence import SequenceParallel


@dataclass
class TPState:
    """A split model's plan, its mesh (None for a single process) and its options."""

    plan: Plan
    mesh: TPMesh | None
    loss_parallel: bool
    sequence: SequenceParallel | None = None  # set when split with sequence_parallel=True (over > 1 rank)
    overlap_comm: bool = True  # input-gradient reductions overlapped with weight gradients (`overlap.py`)
    fsdp: bool = False  # sharded over data-parallel ranks by FSDP2 through tp_plugin (`integrations.fsdp`)


def tp_state(model: nn.Module) -> TPState | None:
    """The TPState of a model split by `tp_plugin.parallelize`, looking through DDP / DeepSpeed engines
    (`.module`), `torch.compile` (`._orig_mod`) and PEFT (which forwards attributes); None if not split."""
    for _ in range(8):
        state = getattr(model, "tp_plugin_state", None)
        if state is not None:
            return state
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None
