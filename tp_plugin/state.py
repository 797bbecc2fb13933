"""What a split model carries (`model.tp_plugin_state`), and the one accessor that finds it behind wrappers."""

from __future__ import annotations

import weakref
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


# Models split over more than one rank in this process, held weakly: what helpers that are handed no model
# (Accelerate's `PartialState.split_between_processes`) read to learn the data-parallel layout.
_SPLIT_MODELS: weakref.WeakSet = weakref.WeakSet()


def note_split(model: nn.Module) -> None:
    _SPLIT_MODELS.add(model)


def split_meshes() -> list[TPMesh]:
    """The distinct (dp, tp) layouts of the split models alive in this process (one, in the usual script)."""
    layouts: dict[str, TPMesh] = {}
    for model in list(_SPLIT_MODELS):
        mesh = model.tp_plugin_state.mesh
        layouts.setdefault(str(mesh.mesh.mesh.tolist()), mesh)
    return list(layouts.values())
