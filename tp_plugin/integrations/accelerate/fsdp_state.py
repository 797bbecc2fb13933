"""Accelerate's FSDP2 path (`distributed_type: FSDP`, `fsdp_version: 2`) for a split model.

    accelerate launch --config_file configs/accelerate/cpu_tp2_fsdp2.yaml examples/finetune.py

Accelerate shards a model with FSDP2 over its own device mesh, which it builds only for its own DTensor TP; for
a model split by tp_plugin it has none and would shard over the whole world, mixing the TP ranks' different
shards. And its resumable state (`save_state` / `load_state`) is one distributed checkpoint (DCP) of the world,
in which the TP ranks' shards share names and offsets: DCP would keep one of them (pytorch #117843's corrupted
checkpoints). Five functions of `accelerate.accelerator` are wrapped; each defers to Accelerate's own unless the
model is split by tp_plugin over more than one rank:

* `fsdp2_prepare_model`: Accelerate's own preparation (its auto-wrap policy, tied embeddings, mixed precision,
  offload) over the data-parallel dim of the split model's mesh, with the TP tags and gradient hooks carried
  over (`integrations.fsdp.keep_tags`).
* `save_fsdp_model` / `save_fsdp_optimizer` / `load_fsdp_model` / `load_fsdp_optimizer`: each TP rank's state is
  its own DCP checkpoint over its data-parallel group, in `<dir>/tp_plugin_model_<i>/tp-rank-<r>-of-<tp>` and
  `<dir>/tp_plugin_optimizer_<i>/tp-rank-<r>-of-<tp>`, whatever `fsdp_state_dict_type` says (a full state dict would be
  written by rank 0, with its TP shard only). Resuming needs the same TP degree; the final model is saved with
  `tp_plugin.save_pretrained` (an ordinary HF checkpoint).
"""

from __future__ import annotations

import functools
from pathlib import Path

from ...mesh import TPMesh
from ...parallel.fsdp import check_data_mesh, data_parallel_mesh, keep_tags
from ...sharding import TPSplitError
from ...state import split_mesh
from .. import patching

_MODULE = "accelerate.accelerator"
MODEL_DIR, OPTIMIZER_DIR = "tp_plugin_model", "tp_plugin_optimizer"  # (not Accelerate's layout: one DCP per TP rank)


class _DataDims:
    """Stands in for Accelerate's ParallelismConfig where `fsdp2_prepare_model` reads the dims to shard over."""

    def __init__(self, name: str):
        self.fsdp_dim_names = [name]


def _wrap_prepare(original):
    @functools.wraps(original)
    def fsdp2_prepare_model(accelerator, model):
        mesh = split_mesh(model)
        if mesh is None:
            return original(accelerator, model)
        dp_mesh = data_parallel_mesh(mesh)
        check_data_mesh(dp_mesh, mesh, "Accelerate's FSDP2")
        state = accelerator.state
        saved = state.device_mesh, state.parallelism_config
        state.device_mesh, state.parallelism_config = mesh.mesh, _DataDims(mesh.mesh.mesh_dim_names[0])
        try:
            with keep_tags(model):
                return original(accelerator, model)
        finally:
            state.device_mesh, state.parallelism_config = saved
    return fsdp2_prepare_model


def _directory(output_dir, prefix: str, index: int, mesh: TPMesh) -> Path:
    return Path(output_dir) / f"{prefix}_{index}" / f"tp-rank-{mesh.tp_rank}-of-{mesh.tp_size}"


def _options(adapter_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=adapter_only, strict=not adapter_only)


def _check_degree(path: Path, mesh: TPMesh) -> None:
    if not path.is_dir():
        found = sorted(p.name for p in path.parent.glob("tp-rank-*")) if path.parent.is_dir() else []
        raise TPSplitError(f"load_state: {path} is missing; the state in {path.parent} was saved with "
                           f"{found or 'no tp_plugin shards'}; resume with the TP degree it was saved with "
                           f"(tp_size={mesh.tp_size} now)")


def save_model_state(model, output_dir, index: int, mesh: TPMesh, adapter_only: bool = False) -> None:
    """This TP rank's model state as a DCP checkpoint over its data-parallel group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(adapter_only))
    dcp.save({"model": state}, checkpoint_id=_directory(output_dir, MODEL_DIR, index, mesh),
             process_group=mesh.dp_group)


def load_model_state(model, input_dir, index: int, mesh: TPMesh, adapter_only: bool = False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    path = _directory(input_dir, MODEL_DIR, index, mesh)
    _check_degree(path, mesh)
    state = {"model": get_model_state_dict(model, options=_options(adapter_only))}
    dcp.load(state, checkpoint_id=path, process_group=mesh.dp_group)
    return set_model_state_dict(model, state["model"], options=_options(adapter_only))


def save_optimizer_state(optimizer, model, output_dir, index: int, mesh: TPMesh) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": state}, checkpoint_id=_directory(output_dir, OPTIMIZER_DIR, index, mesh),
             process_group=mesh.dp_group)


def load_optimizer_state(optimizer, model, input_dir, index: int, mesh: TPMesh) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = _directory(input_dir, OPTIMIZER_DIR, index, mesh)
    _check_degree(path, mesh)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path, process_group=mesh.dp_group)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _wrap_save_model(original):
    @functools.wraps(original)
    def save_fsdp_model(fsdp_plugin, accelerator, model, output_dir, model_index=0, adapter_only=False,
                        use_dcp=True):
        mesh = split_mesh(model)
        if mesh is None:
            return original(fsdp_plugin, accelerator, model, output_dir, model_index, adapter_only, use_dcp)
        save_model_state(model, output_dir, model_index, mesh, adapter_only)
    return save_fsdp_model


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_fsdp_model(fsdp_plugin, accelerator, model, input_dir, model_index=0, adapter_only=False,
                        use_dcp=True):
        mesh = split_mesh(model)
        if mesh is None:
            return original(fsdp_plugin, accelerator, model, input_dir, model_index, adapter_only, use_dcp)
        return load_model_state(model, input_dir, model_index, mesh, adapter_only)
    return load_fsdp_model


def _wrap_save_optimizer(original):
    @functools.wraps(original)
    def save_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, output_dir, optimizer_index=0,
                            use_dcp=True):
        mesh = split_mesh(model)
        if mesh is None:
            return original(fsdp_plugin, accelerator, optimizer, model, output_dir, optimizer_index, use_dcp)
        save_optimizer_state(optimizer, model, output_dir, optimizer_index, mesh)
    return save_fsdp_optimizer


def _wrap_load_optimizer(original):
    @functools.wraps(original)
    def load_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model, input_dir, optimizer_index=0,
                            adapter_only=False, use_dcp=True):
        mesh = split_mesh(model)
        if mesh is None:
            return original(fsdp_plugin, accelerator, optimizer, model, input_dir, optimizer_index, adapter_only,
                            use_dcp)
        load_optimizer_state(optimizer, model, input_dir, optimizer_index, mesh)
    return load_fsdp_optimizer


_WRAPPERS = {"fsdp2_prepare_model": _wrap_prepare, "save_fsdp_model": _wrap_save_model,
             "load_fsdp_model": _wrap_load_model, "save_fsdp_optimizer": _wrap_save_optimizer,
             "load_fsdp_optimizer": _wrap_load_optimizer}


def install() -> None:
    """Wrap the five functions in `accelerate.accelerator`'s namespace (idempotent)."""
    patching.wrap_in_module(_MODULE, _WRAPPERS)


def uninstall() -> None:
    patching.restore_in_module(_MODULE, _WRAPPERS)
