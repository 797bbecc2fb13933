"""What a split model carries (`model.tp_plugin_state`), and the one accessor that finds it behind wrappers."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

from .mesh import TPMesh
from .plan import Plan
from .runtime.sequence import SequenceParallel


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


def mesh_of(model: nn.Module) -> TPMesh | None:
    """The mesh of a model split by tp_plugin (through wrappers); None if it is not split or runs in one process.
    At tp=1 over several processes it is the data-parallel layout (saves write from replica 0 only)."""
    state = tp_state(model)
    return None if state is None else state.mesh


def split_state(model: nn.Module) -> TPState | None:
    """The TPState of a model whose TP group has more than one rank (through wrappers), else None: the model
    computes unsplit and the engines' own code applies."""
    state = tp_state(model)
    return state if state is not None and state.mesh is not None and state.mesh.tp_size > 1 else None


def split_mesh(model: nn.Module) -> TPMesh | None:
    """`split_state(model)`'s mesh: the (dp, tp) layout of a model split over more than one rank, else None."""
    state = split_state(model)
    return None if state is None else state.mesh


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
