"""Cross-rank consistency checks of a split model: cheap, once, and never a hang.

* The first training forward (any client: a plain loop, Accelerate, the Trainer, TRL, DeepSpeed) checks that
  the ranks of each TP group got the same batch and the same RNG state, with one all-gather of two int64s.
  A batch mismatch is an error on every rank of the group; an RNG mismatch (per-rank seeds, a DDP habit) is
  repaired from TP rank 0 with a warning, because the library can: dropout masks on replicated activations
  then agree again.
* `arrive_together` guards calls that every rank must make (saving, `generate`, resizing): the ranks meet in the process group's
  key-value store, not in a collective, so a call made on fewer ranks fails with a clear error after a
  bounded wait instead of hanging in the first gather.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from . import rng
from .sharding import TPSplitError
from .state import tp_state

logger = logging.getLogger("tp_plugin")

ROUTES = ("shard the data over the data-parallel group, not the world: with Accelerate pass the loader to "
          "accelerator.prepare; with the HF Trainer use tp_plugin.TPTrainer, or put tp_plugin.TPTrainerMixin in "
          "front of your Trainer subclass (class MyTrainer(TPTrainerMixin, SFTTrainer)); in a plain loop use "
          "DistributedSampler(dataset, num_replicas=mesh.dp_size, rank=mesh.dp_rank) with "
          "mesh = tp_plugin.tp_state(model).mesh")


def _inputs_digest(args, kwargs) -> int:
    h = hashlib.blake2b(digest_size=8)
    for value in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        if isinstance(value, torch.Tensor):
            h.update(str((value.shape, value.dtype)).encode())
            if not value.is_meta:  # (a meta-device memory model has shapes only)
                h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _device_for(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) \
        else torch.device("cpu")  # NCCL gathers CUDA tensors only


def _gather(values: list[int], group) -> list[tuple[int, ...]]:
    mine = torch.tensor(values, dtype=torch.int64, device=_device_for(group))
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [tuple(int(v) for v in t.tolist()) for t in everyone]


def _who_agrees(values: list[int], group) -> list[list[int]]:
    ranks, same = dist.get_process_group_ranks(group), {}
    for rank, value in zip(ranks, values):
        same.setdefault(value, []).append(rank)
    return list(same.values())


@torch.compiler.disable  # host-side hashing: under torch.compile it runs eagerly, once, then the hook is gone
def check_first_training_forward(args, kwargs, group) -> None:
    """Same batch and same RNG state on every rank of `group` (one all-gather); see the module docstring."""
    gathered = _gather([_inputs_digest(args, kwargs), rng.digest()], group)
    batches, states = [g[0] for g in gathered], [g[1] for g in gathered]
    ranks = dist.get_process_group_ranks(group)
    if len(set(batches)) > 1:
        raise RuntimeError(
            f"tp_plugin: the ranks of tensor-parallel group {ranks} got different batches in their first training "
            f"forward (ranks with equal inputs: {_who_agrees(batches, group)}). The ranks of one TP group compute "
            f"one model together and must see the same batch; only data-parallel replicas get different ones. "
            f"Fix: {ROUTES}.")
    if len(set(states)) > 1:
        if dist.get_rank(group) == 0:
            logger.warning("tp_plugin: the ranks of tensor-parallel group %s had different random states (ranks "
                           "with equal states: %s), e.g. seeded with seed + rank; dropout and sampling would differ "
                           "between ranks computing one model. Their states are now TP rank 0's. Seed every rank "
                           "of a TP group alike (seed + dp_rank, not seed + rank).", ranks, _who_agrees(states, group))
        rng.sync_from_tp_rank0(group)


def install_first_forward_check(model: nn.Module, group) -> None:
    """Run `check_first_training_forward` at the first forward in training mode, then never again."""
    if getattr(model, "_tp_plugin_first_forward", None) is not None:
        return

    def hook(module, args, kwargs):
        if not module.training:
            return None
        model._tp_plugin_first_forward.remove()
        model._tp_plugin_first_forward = "done"
        check_tagged(module, "the first training forward")  # FSDP2 applied without tp_plugin: no collective yet
        check_first_training_forward(args, kwargs, group)
        return None

    model._tp_plugin_first_forward = model.register_forward_pre_hook(hook, with_kwargs=True)


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


# ---- every rank must arrive ------------------------------------------------------------------------------------

TIMEOUT_ENV = "TP_PLUGIN_ARRIVAL_TIMEOUT"  # seconds; 60 by default
_calls: Counter = Counter()


def arrive_together(what: str, fix: str, *, timeout_s: float | None = None) -> None:
    """Return once every rank of the world has called `arrive_together(what, ...)` the same number of times;
    raise a clear error on the ranks that did, if the others have not arrived within `timeout_s`.

    The ranks meet in the default process group's store: the last to arrive sets the verdict "go"; a rank
    that times out sets "missing". The store's compare-and-set decides between the two atomically, so all
    ranks that arrive get the same verdict and no rank enters the collectives that follow alone.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    timeout_s = float(os.environ.get(TIMEOUT_ENV, 60)) if timeout_s is None else timeout_s
    store = dist.distributed_c10d._get_default_store()
    _calls[what] += 1
    key, world = f"tp_plugin/arrive/{what}/{_calls[what]}", dist.get_world_size()
    verdict_key = f"{key}/verdict"
    if store.add(f"{key}/count", 1) == world:
        store.compare_set(verdict_key, "", "go")
    deadline, pause = time.monotonic() + timeout_s, 0.0002
    while not store.check([verdict_key]):
        if time.monotonic() > deadline:
            store.compare_set(verdict_key, "", "missing")
            break
        time.sleep(pause)
        pause = min(2 * pause, 0.05)  # quick when the ranks arrive together, cheap when one never comes
    verdict = store.get(verdict_key).decode()
    if verdict != "go":
        arrived = store.add(f"{key}/count", 0)
        raise TPSplitError(f"tp_plugin: {what} must be called on every rank (each holds part of the model), but "
                           f"only {arrived} of {world} ranks called it within {timeout_s:g} s (rank "
                           f"{dist.get_rank()} did); nothing was written. Fix: {fix}")
