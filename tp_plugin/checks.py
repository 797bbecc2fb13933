"""Cross-rank consistency checks of a split model: cheap, bounded, and never a hang.

* Inputs (`InputChecks`, any client: a plain loop, Accelerate, the Trainer, TRL, DeepSpeed, HF `generate`): the
  ranks of each TP group must get the same inputs. Checked at the first training forward (with the RNG state),
  at the first forward of each evaluation, and on every `generate` prompt, each with one all-gather of one or
  two int64s. A mismatch is an error on every rank of the group, before any wrong number; an RNG mismatch
  (per-rank seeds, a DDP habit) is repaired from TP rank 0 with a warning, because the library can: dropout
  masks on replicated activations then agree again.
* `arrive_together` (`runtime.arrival`) guards calls that every rank of a group must make: a call made on fewer
  ranks fails with a clear error after a bounded wait instead of hanging in the first gather.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .runtime import devices, rng
from .runtime.arrival import exchange_over_store
from .runtime.comm import all_gather_stacked
from .sharding import TPSplitError
from .state import tp_state

logger = logging.getLogger("tp_plugin")

ROUTES = ("shard the data over the data-parallel group, not the world: with Accelerate pass the loader to "
          "accelerator.prepare; with the HF Trainer use tp_plugin.TPTrainer, or put tp_plugin.TPTrainerMixin in "
          "front of your Trainer subclass (class MyTrainer(TPTrainerMixin, SFTTrainer)); in a plain loop use "
          "DistributedSampler(dataset, num_replicas=mesh.dp_size, rank=mesh.dp_rank) with "
          "mesh = tp_plugin.tp_state(model).mesh; for inference, divide prompts with Accelerate's "
          "split_between_processes (over data-parallel replicas once a model is split) or by mesh.dp_rank")


def _inputs_digest(args, kwargs) -> int:
    h = hashlib.blake2b(digest_size=8)
    for value in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        if isinstance(value, torch.Tensor):
            h.update(str((value.shape, value.dtype)).encode())
            if not value.is_meta:  # (a meta-device memory model has shapes only)
                h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _gather(values: list[int], group) -> list[tuple[int, ...]]:
    mine = torch.tensor(values, dtype=torch.int64, device=devices.collective_device(group))
    return [tuple(v) for v in all_gather_stacked(mine, group).tolist()]


def _who_agrees(values: list[int], group) -> list[list[int]]:
    ranks, same = dist.get_process_group_ranks(group), {}
    for rank, value in zip(ranks, values):
        same.setdefault(value, []).append(rank)
    return list(same.values())


def _check_same_inputs(batches: list[int], group, where: str) -> None:
    if len(set(batches)) > 1:
        ranks = dist.get_process_group_ranks(group)
        raise RuntimeError(
            f"tp_plugin: the ranks of tensor-parallel group {ranks} got different batches in {where} (ranks with "
            f"equal batches: {_who_agrees(batches, group)}). The ranks of one TP group compute one model together and "
            f"must see the same inputs; only data-parallel replicas get different ones. Fix: {ROUTES}.")


@torch.compiler.disable  # host-side hashing: under torch.compile it runs eagerly
def check_first_training_forward(args, kwargs, group) -> None:
    """Same batch and same RNG state on every rank of `group` (one all-gather); see the module docstring."""
    gathered = _gather([_inputs_digest(args, kwargs), rng.digest()], group)
    batches, states = [g[0] for g in gathered], [g[1] for g in gathered]
    _check_same_inputs(batches, group, "their first training forward")
    if len(set(states)) > 1:
        ranks = dist.get_process_group_ranks(group)
        if dist.get_rank(group) == 0:
            logger.warning("tp_plugin: the ranks of tensor-parallel group %s had different random states (ranks "
                           "with equal states: %s), e.g. seeded with seed + rank; dropout and sampling would differ "
                           "between ranks computing one model. Their states are now TP rank 0's. Seed every rank "
                           "of a TP group alike (seed + dp_rank, not seed + rank).", ranks, _who_agrees(states, group))
        rng.sync_from_tp_rank0(group)


@torch.compiler.disable
def check_same_inputs(args, kwargs, group, where: str) -> None:
    """Same inputs on every rank of `group` (a digest each, one all-gather of one int64), else an error on all."""
    _check_same_inputs([g[0] for g in _gather([_inputs_digest(args, kwargs)], group)], group, where)


class InputChecks:
    """A split model's forward pre-hook: the ranks of its TP group got the same inputs. Checked at the first
    training forward (with the RNG states), at the first forward of every evaluation (the first eval-mode forward
    after a training-mode one, or ever), and by `generate` on its prompt; not on later forwards of the same
    evaluation nor on generate's decode steps, so a check costs one all-gather of 8 bytes per evaluation or call.
    A callable object rather than a closure, so that a deep copy of the model gets its own."""

    def __init__(self, model: nn.Module, group):
        self.model, self.group = model, group  # the split model (the hook runs on its base model)
        self.trained = False  # the first training forward has been checked
        self.last_training: bool | None = None  # the mode of the previous forward (None: none yet)
        self.generating = 0  # > 0 inside generate(), which checked its prompt itself
        self.enabled = True  # off for pipeline stages, which check their batches themselves

    def __call__(self, module, args, kwargs):
        training = module.training
        if self.generating or not self.enabled:
            return None
        if training and not self.trained:
            self.trained = True
            devices.bind_current_device(self.model, "the first training forward")  # moved since the split?
            check_tagged(self.model, "the first training forward")  # FSDP2 applied without tp_plugin: no collective
            check_ddp_wrapper(self.model, self.group)
            check_first_training_forward(args, kwargs, self.group)
        elif not training and self.last_training is not False:
            devices.bind_current_device(self.model, "an evaluation forward")
            check_same_inputs(args, kwargs, self.group, "an evaluation forward (the first after model.eval())")
        self.last_training = training
        return None

    @contextmanager
    def generate(self, args, kwargs):
        """Around `generate`: its prompt checked once, its forwards not again."""
        devices.bind_current_device(self.model, "generate()")
        check_same_inputs(args, kwargs, self.group, "generate()")
        self.generating += 1
        try:
            yield
        finally:
            self.generating -= 1
            self.last_training = False


def install_input_checks(model: nn.Module, group) -> InputChecks:
    """Put `InputChecks` on the split model (once) and return it. The hook sits on the base model (HF's
    `base_model`, which every head's forward calls as a module): PEFT calls the top model's `forward` directly,
    which runs no hooks of the top model."""
    checks = getattr(model, "tp_plugin_input_checks", None)
    if checks is None:
        checks = model.tp_plugin_input_checks = InputChecks(model, group)
        base = getattr(model, "base_model", None)
        (base if isinstance(base, nn.Module) else model).register_forward_pre_hook(checks, with_kwargs=True)
    return checks


def _calling_ddp():
    """The DistributedDataParallel whose forward is running this one, if any (a look at the calling frames)."""
    from torch.nn.parallel import DistributedDataParallel

    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, DistributedDataParallel):
            return owner
        frame = frame.f_back
    return None


def check_ddp_wrapper(model: nn.Module, group) -> None:
    """At the first training forward: a DDP around the split model must have been built after the split (on its
    current parameters) and over the data-parallel group; else an error on every rank, no collective."""
    ddp = _calling_ddp()
    if ddp is None:
        return
    current = {id(p) for p in model.parameters()}
    held = getattr(ddp, "_module_parameters", None) or []
    if any(id(p) not in current for p in held):
        raise TPSplitError(
            "DistributedDataParallel wrapped the model before tp_plugin.parallelize split it (it holds the unsplit "
            "parameters, which no longer get gradients: training would fail at the second step or not train). "
            "Split first, then wrap: model = tp_plugin.parallelize(model); DDP(model, process_group="
            "tp_plugin.tp_state(model).mesh.dp_group), or let accelerator.prepare / tp_plugin.TPTrainer wrap it")
    ddp_ranks, tp_ranks = dist.get_process_group_ranks(ddp.process_group), dist.get_process_group_ranks(group)
    shared = sorted(set(ddp_ranks) & set(tp_ranks))
    if len(shared) > 1:
        raise TPSplitError(
            f"DistributedDataParallel runs over ranks {ddp_ranks}, which include ranks {shared} of one "
            f"tensor-parallel group: it averages different shards and broadcasts rank {ddp_ranks[0]}'s over the "
            f"others. Fix: DDP(model, process_group=tp_plugin.tp_state(model).mesh.dp_group), or let "
            f"accelerator.prepare / tp_plugin.TPTrainer wrap the split model")


def check_tagged(model: nn.Module, who: str) -> None:
    """Refuse a split model that FSDP2 wrapped without tp_plugin (its parameters lost their TP tags), naming
    the wrapped module; no collective."""
    from torch.distributed.fsdp import FSDPModule

    state = tp_state(model)
    if state is None or state.fsdp:
        return
    wrapped = [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if wrapped:
        raise TPSplitError(
            f"{who}: {wrapped[0]} of the split model was wrapped by torch.distributed.fsdp.fully_shard directly: "
            f"its parameters lost their tensor-parallel tags, so sharded and replicated tensors can no longer be "
            f"told apart (grad norm, save) and the gradient hooks some of them carry are lost. Use "
            f"tp_plugin.fully_shard(model) (or Accelerate's FSDP2, which tp_plugin adapts).")


def check_one_gpu_per_rank(where: str) -> None:
    """Under NCCL: no two ranks on one host share the current CUDA device (NCCL refuses them, and would only say
    so inside the first collective). Each rank posts its host and device to the store; a clash is the same error
    on every rank."""
    if not devices.uses_nccl() or not torch.cuda.is_available():
        return
    everyone = exchange_over_store(f"devices-{where}", f"{devices.host_name()}|{torch.cuda.current_device()}")
    holders: dict[str, list[int]] = {}
    for rank, value in enumerate(everyone):
        holders.setdefault(value, []).append(rank)
    shared = {value: ranks for value, ranks in holders.items() if len(ranks) > 1}
    if shared:
        value, ranks = next(iter(shared.items()))
        host, index = value.rsplit("|", 1)
        raise TPSplitError(
            f"tp_plugin ({where}): ranks {ranks} all use cuda:{index} on host {host}; NCCL needs one GPU per rank "
            f"(and each rank's split model on it). Fix: torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) "
            f"before moving the model, or model.to(f\"cuda:{{os.environ['LOCAL_RANK']}}\") instead of "
            f"model.to('cuda'); `accelerate launch` and `deepspeed` choose it the same way")
