"""The core of a split: policy -> plan -> check -> (sync from TP rank 0) -> apply -> tag. No engine is known here
(`tp_plugin.parallelize` adds the engines' wiring on top).

Everything up to and including the checks is pure and identical on every rank, so bad input fails on all
ranks before the first collective.
"""

from __future__ import annotations

import inspect
import numbers
import weakref

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .runtime import copies, devices, rng
from . import hf_methods, sequence_hooks, state_dicts
from . import policies  # noqa: F401  (importing it registers the built-in families)
from .auto import auto_policy  # the model's own base_model_tp_plan, translated, else its structure
from .checks import check_one_gpu_per_rank, install_input_checks
from .runtime.comm import all_equal, broadcast_from_rank0, fingerprint, sum_grad_over_tp
from .launch_config import configured_tp_size
from .runtime.grad_hooks import add_grad_hook
from .apply import install_layers
from .runtime.layers import PARALLEL_LAYERS, ColumnParallelLinear, RowParallelLinear, tag_param
from .mesh import build_mesh, check_layout, mesh_from, tp_size_of, warn_on_topology, world_size
from .plan import Plan, resolve_plan
from .policy import Policy, get_policy, registered_model_types
from .runtime.regions import install_region, install_row_exit
from .runtime.rng import RankStreams
from .runtime.sequence import SequenceParallel
from .sharding import TPSplitError
from .state import TPState, note_split
from .styles import VocabEmbedding, VocabLMHead, patch_heads


def split_model(model: nn.Module, tp_size: int | None = None, *, mesh: DeviceMesh | None = None,
                policy: Policy | None = None, loss_parallel: bool = False,
                sequence_parallel: bool = False, overlap_comm: bool = True) -> nn.Module:
    """Split `model` in place across the tensor-parallel group and return it (see `tp_plugin.parallelize`)."""
    state = getattr(model, "tp_plugin_state", None)
    if state is not None and mesh is None and tp_size in (None, state.plan.tp_size) \
            and loss_parallel == state.loss_parallel and sequence_parallel == (state.sequence is not None):
        return model  # split already, the same way (`tp-plugin launch` split it at from_pretrained)
    tp_size = tp_size_of(mesh, tp_size) if mesh is not None else resolve_tp_size(tp_size)
    check_not_split(model)
    if mesh is None:
        check_layout(tp_size)
    policy = policy or policy_for(model, tp_size)
    plan = resolve_plan(model, policy, tp_size)
    if sequence_parallel:
        _sequence_layers(model, plan)  # a model sequence parallelism cannot split fails here, on every rank
    if loss_parallel and model.get_output_embeddings() is None:
        raise TPSplitError(f"loss_parallel=True needs an LM head, and {type(model).__name__} has none")

    tp_mesh = None
    if world_size() > 1:
        devices.bind_current_device(model, "parallelize")  # NCCL: the current CUDA device is the model's, or LOCAL_RANK's
        check_one_gpu_per_rank("parallelize")  # ... and no two ranks share one (before the first collective)
    if mesh is not None:
        tp_mesh = mesh_from(mesh)
    elif world_size() > 1:
        tp_mesh = build_mesh(tp_size, devices.mesh_device_type(model))
    if tp_mesh is not None and tp_size > 1:
        if str(dist.get_backend(tp_mesh.tp_group)) != "fake":  # a fake group (memory models) has no peers to ask
            warn_on_topology(tp_mesh)  # a TP group across hosts or unlinked GPUs: one clear warning
            sync_from_tp_rank0(model, tp_mesh.tp_group)
        sp = apply_plan(model, plan, tp_mesh.tp_rank, tp_mesh.tp_group, loss_parallel=loss_parallel,
                        sequence_parallel=sequence_parallel, overlap_comm=overlap_comm)
    else:
        sp = None
    model.tp_plugin_state = TPState(plan, tp_mesh, loss_parallel, sp, overlap_comm)
    if tp_mesh is not None and tp_size > 1:
        hf_methods.bind(model)  # save_pretrained / generate / resize_token_embeddings that know the split
        copies.bind(model)  # copy.deepcopy gives an independent split model on the same groups
        state_dicts.install(model, tp_mesh)  # state dicts say whose shards they hold; full tensors are sliced
        note_split(model)  # Accelerate's split_between_processes divides over its replicas (tp_plugin.state)
        install_input_checks(model, tp_mesh.tp_group)  # same inputs (and RNG state) on every rank of the TP group
        devices.return_freed_memory(model)  # a model loaded whole keeps only its shards' memory
    return model


def resolve_tp_size(tp_size: int | None) -> int:
    """Explicit argument, else the launch config (DeepSpeed `autotp_size`, ...), else the world size."""
    if tp_size is not None and (isinstance(tp_size, bool) or not isinstance(tp_size, numbers.Integral) or tp_size < 1):
        raise TPSplitError(f"parallelize(tp_size={tp_size!r}): the tensor-parallel degree is a positive integer "
                           f"(or None: the launch configuration's, else the world size)")
    configured = configured_tp_size()
    if tp_size is not None and configured is not None and tp_size != configured:
        raise TPSplitError(f"parallelize(tp_size={tp_size}) but the launch configuration says tensor-parallel "
                           f"degree {configured}; drop the argument or make them agree")
    return tp_size or configured or world_size()


def policy_for(model: nn.Module, tp_size: int) -> Policy:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    policy = get_policy(model_type) if model_type else None
    if policy is not None and not isinstance(policy, Policy):  # a function of the model (config variants)
        takes_tp = len(inspect.signature(policy).parameters) > 1  # and of the TP degree (CodeGen's head blocks)
        policy = policy(model, tp_size) if takes_tp else policy(model)
    if policy is None and model_type:
        policy = auto_policy(model)
    if policy is None:
        raise TPSplitError(
            f"no tensor-parallel policy for model_type={model_type!r} ({type(model).__name__}). Registered: "
            f"{registered_model_types()}. Pass `policy=` or register one: "
            f"tp_plugin.register_policy({model_type!r}, Policy(layers={{...}}, attention=AttentionSpec(...)))")
    return policy


def check_not_split(model: nn.Module) -> None:
    """Refuse a model that is already split (by us, DeepSpeed AutoTP or transformers' tp_plan), has adapters, or
    is wrapped by a data-parallel engine."""
    wrapper = _data_parallel_wrapper(model)
    if wrapper is not None:
        raise TPSplitError(f"parallelize got a {wrapper}: split the model before wrapping it. The wrapper holds "
                           f"the unsplit parameters (and DDP averages them over every rank, TP ranks included). "
                           f"Fix: model = tp_plugin.parallelize(model) first, then let accelerator.prepare, "
                           f"tp_plugin.TPTrainer or deepspeed.initialize wrap it, or wrap it yourself over the "
                           f"data-parallel group: DDP(model, process_group=tp_plugin.tp_state(model).mesh.dp_group)")
    if hasattr(model, "tp_plugin_state"):
        raise TPSplitError(f"{type(model).__name__} is already split by tp_plugin "
                           f"(tp_size={model.tp_plugin_state.plan.tp_size}); call parallelize once per model")
    for name, module in model.named_modules():
        if isinstance(module, PARALLEL_LAYERS):
            raise TPSplitError(f"{name} is already a tp_plugin {type(module).__name__}; call parallelize once")
        if type(module).__module__.startswith("deepspeed.module_inject"):
            raise TPSplitError(f"{name} is a DeepSpeed AutoTP layer ({type(module).__name__}): the model is already "
                               f"split by DeepSpeed. Give tp_plugin the unsplit model and remove DeepSpeed's "
                               f"tensor_parallel/autotp setting (tp_plugin reads its autotp_size instead).")
        if hasattr(module, "lora_A") or type(module).__module__.startswith("peft."):
            raise TPSplitError(f"{name} is a PEFT adapter layer ({type(module).__name__}): split the base model "
                               f"first, then add adapters: model = tp_plugin.parallelize(model); "
                               f"model = peft.get_peft_model(model, config)")
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            raise TPSplitError(f"{name} is partitioned by DeepSpeed ZeRO-3 (the model was built under zero.Init: an "
                               f"Accelerator or TrainingArguments with a ZeRO-3 config existed when it was loaded). "
                               f"Load it with tp_plugin.from_pretrained(path) (whole on meta, this rank's slices, "
                               f"partitioned later over the data-parallel group), or set zero3_init_flag: false in "
                               f"the Accelerate config, or split it before creating the Accelerator")
        if isinstance(param, DTensor):
            raise TPSplitError(f"{name} is a DTensor: the model is already sharded (transformers tp_plan / "
                               f"torch tensor parallel). Load it without tp_plan/distributed_config.")


def _data_parallel_wrapper(model: nn.Module) -> str | None:
    """The name of the data-parallel engine `model` is (DDP, DataParallel, FSDP1, a DeepSpeed engine), if any."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, FullyShardedDataParallel)):
        return type(model).__name__
    if any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__):
        return "DeepSpeedEngine"
    return None


def sync_from_tp_rank0(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Make every TP rank start from TP rank 0's weights and RNG state.

    Weights are compared by a fingerprint computed on their device first (one small collective) and broadcast
    only when they differ, e.g. a model initialised with a different seed per rank. The RNG states (CPU and
    CUDA) are copied so that dropout on replicated activations draws the same mask on every rank of the group.
    """
    tensors = [t.data for t in list(model.parameters()) + list(model.buffers())]
    if not any(t.is_meta for t in tensors):  # built on meta: each rank loads its shards later
        if not all_equal(fingerprint(tensors), group):
            broadcast_from_rank0(tensors, group)
    rng.sync_from_tp_rank0(group)


def apply_plan(model: nn.Module, plan: Plan, rank: int, group, *, loss_parallel: bool,
               sequence_parallel: bool = False, overlap_comm: bool = True) -> SequenceParallel | None:
    """Swap every planned module for its parallel layer holding this rank's shard; patch head counts; install
    the regions (and sequence parallelism). Returns the sequence-parallel state, if asked for."""
    streams = RankStreams(rank) if rng.has_dropout(model) else None
    layers_path = _sequence_layers(model, plan) if sequence_parallel else None
    sp = SequenceParallel(sequence_hooks.base_of(model, layers_path), group, streams) if sequence_parallel else None
    install_layers(model, plan.entries, rank, group, loss_parallel=loss_parallel)
    if plan.attention is not None:
        shard = plan.attention.heads[rank]
        for path in plan.attention.paths:
            patch_heads(model.get_submodule(path), plan.attention, shard, local_dims=plan.attention.local_dims)
    for path in plan.regions:
        region_module = model.get_submodule(path)
        region = install_region(region_module, group, sp, streams, overlap=overlap_comm)
        for module in region_module.modules():  # each column layer inside reads the region's input through its call
            if isinstance(module, ColumnParallelLinear) and not module.sync_input_grad:
                module.region = weakref.ref(region)
    for entry in plan.entries:
        if entry.style.region is not None:
            install_region(model.get_submodule(entry.path), group, sp, streams, entry.style.region,
                           overlap=overlap_comm)
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.sequence = sp
        if isinstance(module, RowParallelLinear) and streams is not None:
            install_row_exit(module, streams)
    sharded = {id(p) for m in model.modules() if isinstance(m, PARALLEL_LAYERS) for p in m.parameters()}
    for param in model.parameters():
        if id(param) not in sharded and not hasattr(param, "tp_shard"):  # custom styles tag their own params
            tag_param(param, None)
    for path in plan.partial_grad:
        for param in model.get_submodule(path).parameters():
            add_grad_hook(param, sum_grad_over_tp(group))
            param.tp_partial_grad = True
    if sp is not None:
        _install_sequence_parallel(model, sp, layers_path)
    return sp


def _sequence_layers(model: nn.Module, plan: Plan) -> str:
    """The decoder layers sequence parallelism splits by tokens (checked before anything is communicated)."""
    return sequence_hooks.decoder_layers(model, [e.path for e in plan.entries
                                           if not isinstance(e.style, (VocabEmbedding, VocabLMHead))], plan.regions)


def _install_sequence_parallel(model: nn.Module, sp: SequenceParallel, layers_path: str) -> None:
    for module in model.modules():  # a row-parallel bias is added to this rank's tokens only
        if isinstance(module, RowParallelLinear) and module.bias is not None:
            sp.add_partial(module.bias)
    replicated = [m for m in sequence_hooks.base_of(model, layers_path).modules() if not isinstance(m, PARALLEL_LAYERS)
                  and any(not hasattr(p, "tp_partial_grad") for p in m.parameters(recurse=False))]
    sequence_hooks.install(model, sp, layers_path, replicated)
