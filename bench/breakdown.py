"""Where one training step's time goes, by part of the model: a torch.profiler trace of one step on rank 0,
each op's self time put in the bucket of the module that ran it.

Forward ops belong to the innermost module scope around them (norms, split linears, attention, embedding, LM
head, loss, other). A backward op belongs to the forward op its autograd node was made by (the profiler's
`sequence_nr` links the two), so "norms" holds the norms' forward and backward. Collectives are their own
bucket wherever they run (their time includes waiting for the other rank); `optimizer.step` and
`zero_grad` another. What no op covers (Python between ops, the autograd engine) is "not in any op".
"""

from __future__ import annotations

import time

import torch
from torch import nn

COLLECTIVE_NAMES = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "gloo:", "nccl:",
                    "broadcast", "c10d::", "tp_plugin.runtime.overlap: wait")
BUCKETS = ["split linears", "LM head", "loss", "norms", "attention (the rest)", "MLP (the rest)", "embedding",
           "other", "collectives", "optimizer", "not in any op"]


def _label(module: nn.Module, head: nn.Module | None) -> str | None:
    name = type(module).__name__
    if module is head:
        return "LM head"
    if name in ("ColumnParallelLinear", "RowParallelLinear") or (isinstance(module, nn.Linear)):
        return "split linears"
    if "Norm" in name:
        return "norms"
    if name.endswith("Attention"):
        return "attention (the rest)"
    if name.endswith("MLP"):
        return "MLP (the rest)"
    if "Embedding" in name and "Rotary" not in name:
        return "embedding"
    return None


class _Scopes:
    """Profiler ranges around every labelled module's forward (and the model's loss function)."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings()
        self.handles, self.model = [], model
        for module in model.modules():
            label = _label(module, head)
            if label is None:
                continue
            stack = []
            self.handles.append(module.register_forward_pre_hook(
                lambda m, a, label=label, stack=stack: stack.append(_enter(label))))
            self.handles.append(module.register_forward_hook(
                lambda m, a, o, stack=stack: _exit(stack.pop()), always_call=True))
        self.loss = model.loss_function
        model.loss_function = self._loss

    def _loss(self, *args, **kwargs):
        with torch.profiler.record_function("bucket:loss"):
            return self.loss(*args, **kwargs)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.model.loss_function = self.loss


def _enter(label):
    rf = torch.profiler.record_function(f"bucket:{label}")
    rf.__enter__()
    return rf


def _exit(rf):
    rf.__exit__(None, None, None)


def _is_collective(name: str) -> bool:
    return any(key in name for key in COLLECTIVE_NAMES)


def breakdown(model: nn.Module, step, ids) -> dict:
    """Seconds per bucket of one call of `step(ids)` (after a warm-up call), rank-local."""
    step(ids)
    scopes = _Scopes(model)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step(ids)
            wall = time.perf_counter() - t0
    finally:
        scopes.remove()
    events = [e for e in prof.profiler.function_events]
    by_seq: dict[int, str] = {}

    def scope_of(event) -> str | None:
        """The innermost bucket range around `event`, or the bucket of the forward op behind its autograd node."""
        node = event
        while node is not None:
            if node.name.startswith("bucket:"):
                return node.name.removeprefix("bucket:")
            if node.name in ("Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad") or \
                    node.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
                return "optimizer"
            if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr >= 0:
                return by_seq.get(node.sequence_nr)
            node = node.cpu_parent
        return None

    for e in events:  # forward ops first: their sequence numbers name the backward nodes
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and e.sequence_nr not in by_seq:
            label = scope_of(e)
            if label is not None:
                by_seq[e.sequence_nr] = label
    seconds = dict.fromkeys(BUCKETS, 0.0)
    for e in events:
        if e.name.startswith("bucket:"):
            continue
        self_s = e.self_cpu_time_total / 1e6
        if _is_collective(e.name):
            seconds["collectives"] += self_s
            continue
        seconds[scope_of(e) or "other"] += self_s
    top = [e for e in events if e.cpu_parent is None and not e.name.startswith("bucket:")]
    covered = sum(e.cpu_time_total for e in top) / 1e6
    seconds["not in any op"] = max(0.0, wall - covered)
    return {"wall_s": wall, "seconds": seconds}


def breakdown_rank(rank: int, world: int, job: dict) -> dict | None:
    """Per-rank body for `tests.dist.run_ranks`: set up a bench variant, break down one step on rank 0."""
    from .step import _setup

    torch.set_num_threads(job.get("threads", 1))
    model, step = _setup(job)
    ids = torch.randint(3, model.config.vocab_size, (job["batch"], job["seq"]),
                        generator=torch.Generator().manual_seed(1))
    result = breakdown(model, step, ids)
    return result if rank == 0 else None
