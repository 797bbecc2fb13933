"""DeepSpeed: ZeRO-1/2/3 as the data-parallel axis of a split model, with no extra argument.

    model = tp_plugin.parallelize(model)              # tp size from "tensor_parallel": {"autotp_size": N}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(...),
                                                   config="configs/deepspeed/zero2_tp2.json")

How DeepSpeed learns our (dp, tp) groups, and why this way (DeepSpeed 0.19.8):

* DeepSpeed asks for groups in two places: the `mpu` argument of `deepspeed.initialize`, and its own group
  registry `deepspeed.utils.groups` (module globals `_TENSOR_MODEL_PARALLEL_GROUP`, `_DATA_PARALLEL_GROUP`,
  ...). A config that carries `tensor_parallel.autotp_size` (the key this library reads as the TP degree)
  makes the engine use the registry *as* its mpu (`engine.mpu = groups`): ZeRO 1/2/3 partition over
  `groups.get_data_parallel_group()`, the grad-norm reductions run over `get_model_parallel_group()`, and
  checkpoint files are named `mp_rank_XX` by `get_model_parallel_rank()`. So the key alone switches
  DeepSpeed into (dp x tp) mode. We choose the registry over an `mpu` argument because the callers that
  matter do not pass one: the HF Trainer and Accelerate call `deepspeed.initialize` themselves, without mpu,
  but they do pass the user's json, key included.
* The registry is filled by `groups._init_tp_mesh_device(autotp_size)`, which builds a (dp, tp) mesh with TP
  innermost: the same layout as ours. DeepSpeed then calls `set_deepspeed_parallelism()` on every module that
  has it (its MoE hook) *after* the registry is set and *before* any parameter is broadcast or partitioned.
  `prepare_model` gives the split model such a hook. It checks DeepSpeed's layout against the model's mesh
  (a config whose autotp_size differs from the split, or a config without the key, is an error that names
  both degrees, raised identically on every rank before DeepSpeed broadcasts or partitions anything), then
  installs the model's own groups in the registry, so every later ZeRO / grad-norm collective runs on them.
* DeepSpeed's AutoTP would split the model a second time. `_apply_autotp_partitioning` returns at once for a
  model flagged `ds_autotp_parsed` (its own "already split" flag), which `prepare_model` sets.
* DeepSpeed's gradient clipping counts a parameter on every TP rank when it is tagged `model_parallel` /
  `tensor_model_parallel` (our sharded params are), and replicated ones on TP rank 0 only, then sums over
  the model-parallel group: the TP-correct norm. Only replicated KV heads (`tp_replicas` > 1) would be
  counted once per holder; the hook untags them on every holder but the first, which is then the only one
  counting them (the first holder is TP rank 0 or tagged), so each row is counted exactly once.

Without the key, `deepspeed.initialize(..., mpu=tp_plugin.mpu(model))` works too
(Megatron's mpu contract), e.g. for a config that must not carry `tensor_parallel`.

Known limits (DeepSpeed's, shared by its own AutoTP): with the key and no mpu, DeepSpeed computes
`train_batch_size` as micro batch x accumulation x *world* size (it builds its config before its TP groups),
so give `train_micro_batch_size_per_gpu` and `gradient_accumulation_steps`, not `train_batch_size`; the
registry is process-global, so two live engines in one process must use the same TP degree.
"""

from __future__ import annotations

import sys
import weakref

import torch.distributed as dist
from torch import nn

from ..mesh import TPMesh
from ..sharding import TPSplitError
from ..state import tp_state


class TPMpu:
    """Megatron's `mpu` contract over a split model's mesh (tensor parallel = model parallel, no pipeline)."""

    def __init__(self, mesh: TPMesh):
        self.mesh = mesh

    def get_model_parallel_group(self):
        return self.mesh.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.mesh.tp_group, 0)

    def get_data_parallel_group(self):
        return self.mesh.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.mesh.dp_group)


def mpu(model: nn.Module) -> TPMpu:
    """The `mpu` to pass to `deepspeed.initialize` when the config does not carry `autotp_size`."""
    state = tp_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} has not been split by tp_plugin.parallelize")
    mesh = state.mesh
    if mesh is None:
        raise ValueError(f"{type(model).__name__} is not split across processes (call tp_plugin.parallelize "
                         f"under torch.distributed first)")
    return TPMpu(mesh)


def prepare_model(model: nn.Module) -> None:
    """Make `deepspeed.initialize(model=model, ...)` train the split model on its own groups (see module doc).

    Called by `parallelize` for tp > 1. Only sets attributes: DeepSpeed need not be installed.
    """
    model.ds_autotp_parsed = True  # DeepSpeed's own flag: AutoTP leaves the model alone
    model.set_deepspeed_parallelism = _UseModelGroups(tp_state(model).mesh, model)
    _forget_installed_groups()


# The groups the hook last put in DeepSpeed's registry. DeepSpeed builds its TP groups only while the registry
# is empty, so groups left there by an earlier model would hide the autotp_size of the next config (and a
# mismatch with it). A new split model therefore takes them out again; only ours, never DeepSpeed's own.
_installed: list = []


def _forget_installed_groups() -> None:
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and _installed and groups._TENSOR_MODEL_PARALLEL_GROUP is _installed[0]:
        groups._TENSOR_MODEL_PARALLEL_GROUP = groups._MODEL_PARALLEL_GROUP = groups._DATA_PARALLEL_GROUP = None
        if groups.mpu is groups or isinstance(groups.mpu, TPMpu):  # the previous engine's mpu, not a user's
            groups.mpu = None
    _installed.clear()


class _UseModelGroups:
    """The hook DeepSpeed calls during `initialize`; see the module docstring."""

    def __init__(self, mesh: TPMesh, model: nn.Module):
        self.mesh = mesh
        self.model = weakref.ref(model)  # the hook lives on the model: no reference cycle

    def __call__(self, *_args, **_kwargs) -> None:
        from deepspeed.utils import groups

        ours = self.mesh
        hint = (f'add "tensor_parallel": {{"autotp_size": {ours.tp_size}}} to the DeepSpeed config (or pass '
                f"mpu=tp_plugin.mpu(model) to deepspeed.initialize)")
        if groups.mpu is None:
            raise TPSplitError(f"deepspeed.initialize got a model split with tp_size={ours.tp_size}, but neither the "
                               f"DeepSpeed config (tensor_parallel.autotp_size) nor an mpu tells DeepSpeed about "
                               f"tensor parallelism: ZeRO would treat all {dist.get_world_size()} ranks as data-"
                               f"parallel replicas and mix different shards. Fix: {hint}")
        ds_tp = groups.mpu.get_model_parallel_world_size()
        ds_dp = dist.get_process_group_ranks(groups.mpu.get_data_parallel_group())
        our_dp = dist.get_process_group_ranks(ours.dp_group)
        if ds_tp != ours.tp_size or ds_dp != our_dp:
            raise TPSplitError(f"the DeepSpeed config says tensor_parallel.autotp_size={ds_tp} (data-parallel ranks "
                               f"{ds_dp}), but the model was split by tp_plugin with tp_size={ours.tp_size} "
                               f"(data-parallel ranks {our_dp}). Make them agree: set autotp_size to "
                               f"{ours.tp_size}, or call parallelize(model) without tp_size so it reads the config")
        if groups.mpu is groups:  # the registry is DeepSpeed's mpu: make it hand out the model's own groups
            groups._TENSOR_MODEL_PARALLEL_GROUP = groups._MODEL_PARALLEL_GROUP = ours.tp_group
            groups._DATA_PARALLEL_GROUP = ours.dp_group
        _installed[:] = [groups._TENSOR_MODEL_PARALLEL_GROUP]
        _count_replicated_rows_once(self.model(), ours.tp_rank)


def _count_replicated_rows_once(model: nn.Module, tp_rank: int) -> None:
    """Untag replicated KV-head shards on every holder but the first, for DeepSpeed's grad norm."""
    for entry in tp_state(model).plan.entries:
        if not entry.shared_rows:
            continue
        mine = entry.specs[tp_rank]["weight"]
        first_holder = next(r for r, specs in enumerate(entry.specs) if specs["weight"] == mine)
        if tp_rank != first_holder:
            for p in model.get_submodule(entry.path).parameters():
                p.model_parallel = p.tensor_model_parallel = False
