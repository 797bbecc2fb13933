"""Accelerate: a script written for `Accelerator` trains a tp_plugin-split model, with no extra calls.

    accelerate launch --config_file configs/accelerate/cpu_tp2_dp2.yaml train.py

    model = tp_plugin.parallelize(AutoModelForCausalLM.from_pretrained(path))   # degree from the yaml
    accelerator = Accelerator()                                                  # after the split
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

`import tp_plugin` changes nothing here. What the first split does (`tp_plugin.parallelize`, also through
`tp_plugin.from_pretrained`), each step a no-op outside its case:

1. `prepare_launch()`, before the split, under `accelerate launch` only:
   * TP degree from the yaml. `parallelism_config: {parallelism_config_tp_size: N}` is the one yaml key that
     `accelerate launch` exports to the processes for a MULTI_GPU or DEEPSPEED config (as
     `PARALLELISM_CONFIG_TP_SIZE`, with `ACCELERATE_USE_PARALLELISM_CONFIG=true`). tp_plugin reads it as its TP
     degree (`config.yaml_tp_size`) and sets the flag to false, so that an `Accelerator()` created after the
     split does not build its own DTensor TP (which needs FSDP2 and refuses CPU and DeepSpeed).
   * CPU launches. Without a GPU, a MULTI_GPU config starts N processes but Accelerate finds no backend and
     runs each as a single process. tp_plugin starts Accelerate's shared `PartialState` on gloo: `cpu=True`
     (MULTI_CPU, plus `ACCELERATE_USE_CPU=true` for `Accelerator()`), or for DEEPSPEED `backend="gloo"` (what
     `InitProcessGroupKwargs(backend="gloo")` would do). A single-process `PartialState()` the script made
     before the split is replaced (its objects see the new state). On a GPU machine nothing changes.
2. `install()`: `Accelerator.prepare_model / prepare_data_loader / prepare / clip_grad_norm_` are wrapped;
   `uninstall()` restores them. When a model split by tp_plugin (TP > 1) is involved, and only then:
   * DDP is built over the data-parallel group (Accelerate passes no process group, and DDP over the world
     would average different shards and overwrite them from rank 0): the `ddp_handler` gets `process_group`.
   * Data loaders are sharded over the DP group only: Accelerate is handed a device mesh with a "tp"
     dimension (its own mechanism: `torch_device_mesh`), so all TP ranks of a replica get the same batch.
   * `clip_grad_norm_` uses the unsplit model's norm (`tp_plugin.grad_norm`).
   * `gather_for_metrics` counts each sample once (over the DP group) and `split_between_processes` divides
     inputs over DP replicas (`data.py`).
   * FSDP2 (`distributed_type: FSDP`, `fsdp_version: 2`) shards over the DP dim, and `save_state`/`load_state`
     keep every TP rank's shards (`fsdp_state.py`), and so do they under DDP (`ddp_state.py`); FSDP1
     is refused (it would flatten the TP shards together).
   (The first training forward checks, once, that the TP ranks got the same batch: `tp_plugin.checks`, in
   every path, not only Accelerate's.)
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ...launch_config import ACCELERATE_LAUNCH_MARKER, yaml_tp_size
from ...mesh import TPMesh
from ...state import split_mesh
from .. import patching

def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launched_by_accelerate() -> bool:
    return ACCELERATE_LAUNCH_MARKER in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _has_gpu() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return accel.is_available()
    return torch.cuda.is_available()


def _yaml_sizes() -> dict[str, int]:
    return {k: int(os.environ.get(f"PARALLELISM_CONFIG_{k.upper()}_SIZE", "1") or 1)
            for k in ("dp_replicate", "dp_shard", "cp", "sp")}


def check_parallelism_sizes(tp: int, sizes: dict[str, int], world: int, where: str) -> None:
    """Accelerate's parallelism sizes next to tp_plugin's TP degree: the data-parallel ones must make up the rest
    of the world (that is what Accelerate validates too); cp and sp are not tp_plugin's (error before any split)."""
    busy = {k: v for k, v in sizes.items() if k in ("cp", "sp") and v != 1}
    if busy:
        raise ValueError(f"tp_plugin: {where} sets tp_size={tp} together with {busy}; tp_plugin provides TP with "
                         f"DDP, DeepSpeed ZeRO or FSDP2 as the data-parallel axis and cannot combine with "
                         f"Accelerate's cp / sp. Keep parallelism_config_tp_size and the dp sizes only.")
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    if dp > 1 and tp * dp != world:
        raise ValueError(f"tp_plugin: {where}: tp_size {tp} x dp_replicate_size {sizes['dp_replicate']} x "
                         f"dp_shard_size {sizes['dp_shard']} = {tp * dp}, but there are {world} processes. Make "
                         f"their product the number of processes (e.g. dp_shard_size {world // tp}).")


def take_over_parallelism_config() -> None:
    """Keep `Accelerator()` from building its own TP from the yaml key that tp_plugin reads (step 1)."""
    size = yaml_tp_size()
    if size is None or not _flag("ACCELERATE_USE_PARALLELISM_CONFIG"):
        return
    check_parallelism_sizes(size, _yaml_sizes(), int(os.environ.get("WORLD_SIZE", "1")), "the Accelerate yaml")
    os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = "false"


def release_parallelism_config(accelerator, mesh: TPMesh) -> None:
    """An `Accelerator()` made before the split (the usual order) validated the yaml's parallelism sizes and keeps
    a `ParallelismConfig` with tp_size > 1, which would send `prepare` down Accelerate's own DTensor TP path. Once
    it prepares a model split by tp_plugin, tp_plugin is the TP: the config is checked against the split's layout
    and dropped, and Accelerate runs DDP / FSDP2 over the split model's data-parallel group, as when the
    Accelerator is made after the split."""
    state = accelerator.state
    config = getattr(state, "parallelism_config", None)
    if config is None:
        return
    sizes = {k: getattr(config, f"{k}_size", 1) for k in ("dp_replicate", "dp_shard", "cp", "sp")}
    if config.tp_size not in (1, mesh.tp_size):
        raise ValueError(f"tp_plugin: the Accelerator's parallelism config says tp_size={config.tp_size}, but the "
                         f"model was split with tp_size={mesh.tp_size}; make them agree (drop the tp_size argument "
                         f"of parallelize to take the launch configuration's)")
    check_parallelism_sizes(mesh.tp_size, sizes if config.tp_size > 1 else {**sizes, "dp_replicate": 1},
                            mesh.tp_size * mesh.dp_size, "the Accelerator's parallelism config")
    state.parallelism_config = None
    state.device_mesh = None


def prepare_cpu_launch() -> None:
    """Make `accelerate launch` with N processes run N gloo ranks on a machine without a GPU (step 1)."""
    if not launched_by_accelerate() or _flag("ACCELERATE_USE_CPU") or _has_gpu():
        return
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    if PartialState._shared_state:
        if PartialState().num_processes > 1:
            return  # a distributed state already (set up by this function, or by the script)
        # made before the split without a backend: one process per rank (torch.distributed may be up already,
        # e.g. by DeepSpeed; the new state adopts it)
        if AcceleratorState._shared_state:
            raise RuntimeError("tp_plugin: an Accelerator was created before tp_plugin.parallelize on a machine "
                               "without GPU, and runs every launched process as a single process (no backend). "
                               "Run the command under `tp-plugin launch -- accelerate launch ...` (it gives the "
                               "processes gloo before the script starts), or split the model first, then create "
                               "the Accelerator.")
        PartialState._reset_state()

    # The shared state made now is what PartialState() / Accelerator() find later, so the script may also
    # split its model before creating its Accelerator (needed under ZeRO-3, see examples/finetune.py).
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        # ACCELERATE_USE_CPU would turn DeepSpeed off (Accelerate picks MULTI_CPU), and Accelerate passes no
        # backend to DeepSpeed without a GPU, so it would count one process.
        PartialState(backend="gloo")
    elif _flag("ACCELERATE_USE_FSDP"):
        # Accelerate picks FSDP only over a GPU-type state (on MULTI_CPU it would silently run DDP): the gloo
        # MULTI_CPU state is relabelled MULTI_GPU; its device stays the CPU.
        from accelerate.utils import DistributedType

        os.environ["ACCELERATE_USE_CPU"] = "true"
        PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerator(): cpu=True
        PartialState(cpu=True)  # MULTI_CPU: gloo over the launched processes


# ---- the Accelerator hooks (step 2) --------------------------------------------------------------------------


class _WithProcessGroup:
    """Accelerate's `ddp_handler`, plus the DP process group (DistributedDataParallelKwargs has no such field)."""

    def __init__(self, base, group):
        self.base, self.group = base, group

    def to_kwargs(self) -> dict:
        return {**(self.base.to_kwargs() if self.base is not None else {}), "process_group": self.group}

    def register_comm_hook(self, model) -> None:
        if self.base is not None:
            self.base.register_comm_hook(model)


def data_mesh(mesh: TPMesh, distributed_type) -> DeviceMesh:
    """The mesh Accelerate's `prepare_data_loader` reads to give every TP rank of a replica the same batch.

    Its DeepSpeed branch divides by the "tp" size; its other branch counts data-parallel ranks in a dimension
    named "dp_replicate", so that one gets the same groups under that name (no new communicators).
    """
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        return mesh.mesh
    cached = getattr(mesh, "_accelerate_data_mesh", None)
    if cached is None:
        cached = DeviceMesh.from_group([mesh.dp_group, mesh.tp_group], mesh.mesh.device_type,
                                       mesh=mesh.mesh.mesh, mesh_dim_names=("dp_replicate", "tp"))
        mesh._accelerate_data_mesh = cached
    return cached


def register(accelerator, model) -> None:
    """Tell `accelerator` about the split model it prepares (its mesh drives DDP, data sharding and gathers)."""
    mesh = split_mesh(model)
    if mesh is None:
        return
    known = getattr(accelerator, "_tp_plugin_mesh", None)
    if known is not None and known.mesh.mesh.tolist() != mesh.mesh.mesh.tolist():
        raise ValueError(f"tp_plugin: one Accelerator got two split models with different layouts "
                         f"({known.mesh} and {mesh.mesh}); split every model it prepares (policy, reference model) "
                         f"with the same tp_size")
    release_parallelism_config(accelerator, mesh)
    accelerator._tp_plugin_mesh = known or mesh


def _wrap_prepare(original):
    @functools.wraps(original)
    def prepare(self, *args, **kwargs):
        for obj in args:  # before any data loader in the same call is prepared
            if isinstance(obj, nn.Module):
                register(self, obj)
        return original(self, *args, **kwargs)
    return prepare


def _wrap_prepare_model(original):
    @functools.wraps(original)
    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        from accelerate.utils import DistributedType

        mesh = split_mesh(model)
        if mesh is None:
            return original(self, model, device_placement, evaluation_mode)
        register(self, model)
        if self.distributed_type == DistributedType.FSDP and self.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError("tp_plugin: FSDP1 flattens every parameter of a wrapped module into one over all "
                             "ranks, tensor-parallel shards included; use `fsdp_version: 2` in the Accelerate "
                             "config (FSDP2 shards over the data-parallel dim of the split model's mesh)")
        handler = self.ddp_handler
        self.ddp_handler = _WithProcessGroup(handler, mesh.dp_group)
        try:
            return original(self, model, device_placement, evaluation_mode)
        finally:
            self.ddp_handler = handler
    return prepare_model


def _wrap_prepare_data_loader(original):
    @functools.wraps(original)
    def prepare_data_loader(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
        mesh = getattr(self, "_tp_plugin_mesh", None)
        if mesh is None or getattr(data_loader, "_is_accelerate_prepared", False):
            return original(self, data_loader, device_placement, slice_fn_for_dispatch)
        from accelerate.utils import DistributedType

        deepspeed = self.distributed_type == DistributedType.DEEPSPEED
        attr = "ds_device_mesh" if deepspeed else "device_mesh"
        saved = self.state.__dict__.get(attr, _MISSING)
        setattr(self.state, attr, data_mesh(mesh, self.distributed_type))
        try:
            return original(self, data_loader, device_placement, slice_fn_for_dispatch)
        finally:
            if saved is _MISSING:
                delattr(self.state, attr)
            else:
                setattr(self.state, attr, saved)
    return prepare_data_loader


def _wrap_clip_grad_norm(original):
    @functools.wraps(original)
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        from accelerate.utils import DistributedType

        mesh = getattr(self, "_tp_plugin_mesh", None)
        if mesh is None or self.distributed_type == DistributedType.DEEPSPEED:
            return original(self, parameters, max_norm, norm_type)  # DeepSpeed clips in its engine
        from ...grad_norm import clip_grad_norm_ as tp_clip

        self.unscale_gradients()
        return tp_clip(list(parameters), max_norm, norm_type, tp_group=mesh.tp_group)
    return clip_grad_norm_


def _wrap_state_io(original):
    """`save_state` / `load_state`: under DDP, each TP rank's model and optimizer state is saved and loaded by
    `ddp_state.py` (Accelerate alone would keep rank 0's shards only); FSDP2 and DeepSpeed have their own."""
    @functools.wraps(original)
    def state_io(self, *args, **kwargs):
        from accelerate.utils import DistributedType

        from . import ddp_state

        mesh = getattr(self, "_tp_plugin_mesh", None)
        if mesh is None or self.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return original(self, *args, **kwargs)
        with ddp_state.active(self):
            return original(self, *args, **kwargs)
    return state_io


_MISSING = object()


_WRAPPED = ("prepare", "prepare_model", "prepare_data_loader", "clip_grad_norm_", "save_state", "load_state")
_WRAPPERS = {"prepare": _wrap_prepare, "prepare_model": _wrap_prepare_model,
             "prepare_data_loader": _wrap_prepare_data_loader, "clip_grad_norm_": _wrap_clip_grad_norm,
             "save_state": _wrap_state_io, "load_state": _wrap_state_io}


def install() -> None:
    """Wrap the Accelerator methods and Accelerate's FSDP2 functions (`fsdp_state.py`), idempotent. Each wrapper
    defers to Accelerate unless a split model is in play."""
    from accelerate import Accelerator

    from . import data, ddp_state, fsdp_state

    fsdp_state.install()
    ddp_state.install()
    data.install()
    for name in _WRAPPED:
        patching.wrap(Accelerator, name, _WRAPPERS[name])


def uninstall() -> None:
    """Give `Accelerator` its own methods back."""
    import sys

    from . import data, ddp_state, fsdp_state

    fsdp_state.uninstall()
    ddp_state.uninstall()
    data.uninstall()
    Accelerator = getattr(sys.modules.get("accelerate"), "Accelerator", None)
    if Accelerator is not None:
        for name in _WRAPPED:
            patching.restore(Accelerator, name)


def prepare_launch() -> None:
    """Run by `tp_plugin.parallelize` before it splits (see the module docstring, step 1)."""
    take_over_parallelism_config()
    prepare_cpu_launch()
