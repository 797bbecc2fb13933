"""Accelerate's per-sample data helpers on a split model: each sample counted once, inputs divided over replicas.

The ranks of one tensor-parallel group compute one model on the same samples; only data-parallel replicas hold
different ones. Accelerate's helpers count processes, so on a split model each sample would be gathered tp
times, and the end-of-loader remainder (computed for the replicas by the DP-sharded loader) would cut the
wrong rows. Two helpers change meaning, each only when a split model is involved:

* `Accelerator.gather_for_metrics` (the Trainer's evaluation and prediction loops, TRL's metrics, custom eval
  loops) gathers over the data-parallel group of the split model the accelerator prepared: one copy of each
  replica's rows, in replica order, then Accelerate's own remainder logic drops the last batch's padding. Every
  TP rank gets the same result. With one replica it returns its input, as one process does.
* `PartialState.split_between_processes` (also reached through `Accelerator` and `AcceleratorState`) divides
  the inputs over the replicas of the split model alive in this process: the ranks of a TP group get the same
  share (no `prepare` needed: Accelerate's distributed-inference recipe moves the model by hand).

`gather`, `reduce` and `pad_across_processes` keep their documented meaning, every process: transformers and TRL
rely on it (the Trainer divides the token count it gathers for loss normalisation by the TP degree), and
padding to the longest row over all processes equals padding over replicas. For per-sample results use
`gather_for_metrics`, as Accelerate recommends.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ...mesh import TPMesh
from ...runtime.comm import all_gather_along
from ...sharding import TPSplitError
from ...state import split_meshes
from .. import patching


def gather_replicas(data, mesh: TPMesh):
    """Accelerate's `gather` over the data-parallel group: tensors (nested) concatenated on dim 0."""
    from accelerate.utils import recursively_apply

    if mesh.dp_size == 1:
        return data

    def gather_one(tensor: torch.Tensor) -> torch.Tensor:
        return all_gather_along(tensor[None] if tensor.ndim == 0 else tensor, 0, mesh.dp_group)

    return recursively_apply(gather_one, data, error_on_other_type=True)


def gather_replica_objects(objects, mesh: TPMesh) -> list:
    """Accelerate's `gather_object` over the data-parallel group: the replicas' lists, concatenated."""
    if mesh.dp_size == 1:
        return objects
    parts = [None] * mesh.dp_size
    dist.all_gather_object(parts, objects, group=mesh.dp_group)
    return [x for part in parts for x in part]


@contextmanager
def _swapped(owner, name: str, value):
    """`owner.name = value` for the duration (an instance attribute is removed again, a module's restored)."""
    missing = object()
    saved = owner.__dict__.get(name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, saved)


def wrap_gather_for_metrics(original):
    @functools.wraps(original)
    def gather_for_metrics(self, input_data, use_gather_object=False):
        mesh = getattr(self, "_tp_plugin_mesh", None)
        if mesh is None:
            return original(self, input_data, use_gather_object)
        import accelerate.accelerator as module  # where gather_for_metrics looks gather_object up

        with _swapped(self, "gather", lambda data: gather_replicas(data, mesh)), \
                _swapped(module, "gather_object", lambda objects: gather_replica_objects(objects, mesh)):
            return original(self, input_data, use_gather_object)
    return gather_for_metrics


class _ReplicaView:
    """A PartialState as the data sees it: one process per data-parallel replica."""

    def __init__(self, state, mesh: TPMesh):
        self._state, self.num_processes, self.process_index = state, mesh.dp_size, mesh.dp_rank

    def __getattr__(self, name):
        return getattr(self._state, name)


def replica_mesh() -> TPMesh | None:
    """The layout of the split model(s) alive in this process, if any; two different ones are ambiguous."""
    meshes = split_meshes()
    if len(meshes) > 1:
        raise TPSplitError(f"split_between_processes: this process holds split models of {len(meshes)} different "
                           f"layouts ({[m.mesh.mesh.tolist() for m in meshes]}), so which ranks share inputs is "
                           f"ambiguous; split every model with the same tp_size, or divide the inputs by hand over "
                           f"tp_plugin.tp_state(model).mesh.dp_rank / dp_size")
    return meshes[0] if meshes else None


def wrap_split_between_processes(original):
    @functools.wraps(original)
    def split_between_processes(self, inputs, apply_padding: bool = False):
        mesh = replica_mesh()
        if mesh is None:
            return original(self, inputs, apply_padding)
        return original(_ReplicaView(self, mesh), inputs, apply_padding)
    return split_between_processes


def install() -> None:
    from accelerate import Accelerator, PartialState

    for owner, name, wrap in ((Accelerator, "gather_for_metrics", wrap_gather_for_metrics),
                              (PartialState, "split_between_processes", wrap_split_between_processes)):
        patching.wrap(owner, name, wrap, raw=True)


def uninstall() -> None:
    import sys

    accelerate = sys.modules.get("accelerate")
    for owner_name, name in (("Accelerator", "gather_for_metrics"), ("PartialState", "split_between_processes")):
        owner = getattr(accelerate, owner_name, None)
        if owner is not None:
            patching.restore(owner, name)
