"""TRL's fused LM head on a split model: per-token log-probs (and TRL's metrics) over the whole vocabulary.

TRL 1.x trainers (SFT, DPO, GRPO, RLOO, KTO) score tokens with `add_fused_lm_head`: the patched forward reads
`get_output_embeddings().weight` directly and hands it to `ChunkedLogProbFunction`, which never builds the
`[tokens, vocab]` logits. On a split model that weight is this rank's vocabulary shard, so the softmax would
cover 1/tp of the vocabulary and the LM head's collectives would be skipped: losses silently wrong.

`install()` puts a dispatcher in the one place TRL looks the function up (`trl.trainer.utils.
_ChunkedLogProbFunction`): for a tp_plugin vocabulary shard it runs `VocabParallelLogProbs`, for anything else
TRL's own function. `uninstall()` puts TRL's back. The vocab-parallel version computes, in token chunks, the
local logits of this rank's vocabulary slice and combines the statistics over the TP group:

    forward:  all-reduce MAX of [row max, max logit before the target]   (stable softmax, is_top1)
              all-reduce SUM of [sum exp, sum exp*z, sum exp^2, sum z, target logit]  (log Z, entropy, ...)
    backward: all-reduce SUM of the input gradient (the hidden states feed every rank's vocabulary slice)

The same three collectives as tp_plugin's vocab-parallel cross-entropy plus the LM head's own backward one; no
rank ever holds more than one chunk of `[tokens, vocab / tp]` logits.

`replica_view` (used by `TPTrainerMixin` around GRPO's and RLOO's generation, scoring and loss) makes their
world-wide gathers count each data-parallel replica once.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..runtime.comm import all_reduce
from . import patching

OPTIONAL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_CHUNK_ELEMENTS = 1 << 24  # local logits per chunk: 64 MiB in fp32


def _transform(z: torch.Tensor, logit_scale: float, softcap: float | None, inv_t: float) -> torch.Tensor:
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z * inv_t


class VocabParallelLogProbs(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction` contract, on a vocabulary shard `weight [V_local(+pad), H]`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs, head):
        ctx.set_materialize_grads(False)
        group, start, width = head.group, head.vocab_start, head.vocab_stop - head.vocab_start
        vocab = head.spec.full_size
        inv_t = 1.0 / temperature
        n = hidden.shape[0]
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        w = weight[:width].to(dtype)  # padding rows are not vocabulary
        b = None if bias is None else bias[:width].to(dtype)
        local = targets - start
        owned = (local >= 0) & (local < width)
        f32 = dict(device=hidden.device, dtype=torch.float32)
        maxes = torch.full((2, n), -math.inf, **f32)  # row max, max before the target
        sums = torch.zeros((5, n), **f32)  # sum exp, sum exp*z, sum exp^2, sum z, target logit
        chunk = max(1, _CHUNK_ELEMENTS // max(width, 1))
        chunks = []
        for a in range(0, n, chunk):  # pass 1: local maxima (needed before any exp)
            z = _transform(torch.nn.functional.linear(hidden[a:a + chunk].to(dtype), w, b).float(),
                           logit_scale, softcap, inv_t)
            maxes[0, a:a + chunk] = z.amax(-1)
            before = torch.arange(width, device=z.device) < local[a:a + chunk].clamp(max=width).unsqueeze(-1)
            maxes[1, a:a + chunk] = z.masked_fill(~before, -math.inf).amax(-1)
            chunks.append((a, z if len(chunks) == 0 and a + chunk >= n else None))
        all_reduce(maxes, group, op=dist.ReduceOp.MAX)
        m = maxes[0]
        for a, z in chunks:  # pass 2: sums relative to the global max
            if z is None:
                z = _transform(torch.nn.functional.linear(hidden[a:a + chunk].to(dtype), w, b).float(),
                               logit_scale, softcap, inv_t)
            e = torch.exp(z - m[a:a + chunk].unsqueeze(-1))
            sums[0, a:a + chunk] = e.sum(-1)
            sums[1, a:a + chunk] = (e * z).sum(-1)
            sums[2, a:a + chunk] = (e * e).sum(-1)
            sums[3, a:a + chunk] = z.sum(-1)
            mine = owned[a:a + chunk]
            picked = z.gather(-1, local[a:a + chunk].clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
            sums[4, a:a + chunk] = torch.where(mine, picked, 0.0)
        all_reduce(sums, group)
        sum_exp, x_sum_exp, sq_sum_exp, z_sum, target_logit = sums
        log_z = m + torch.log(sum_exp)
        log_probs = target_logit - log_z
        entropy = log_z - x_sum_exp / sum_exp if "entropy" in outputs else None
        log_sum_sq = torch.log(sq_sum_exp) - 2 * torch.log(sum_exp) if "log_sum_sq_probs" in outputs else None
        mean_logits = z_sum / vocab if "mean_logits" in outputs else None
        is_top1 = (target_logit >= m) & (target_logit > maxes[1]) if "is_top1" in outputs else None
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.head, ctx.params = head, (dtype, softcap, logit_scale, inv_t, chunk)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        dtype, softcap, logit_scale, inv_t, chunk = ctx.params
        head = ctx.head
        start, width = head.vocab_start, head.vocab_stop - head.vocab_start
        w = weight[:width].to(dtype)
        b = None if bias is None else bias[:width].to(dtype)
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)
        columns = torch.arange(start, start + width, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            h = hidden[a:a + chunk].to(dtype)
            y = torch.nn.functional.linear(h, w, b).float() * logit_scale
            t = torch.tanh(y / softcap) if softcap is not None else None
            z = (softcap * t if softcap is not None else y) * inv_t
            log_p = z - log_z[a:a + chunk].unsqueeze(-1)
            p = torch.exp(log_p)
            g = torch.zeros_like(z)
            if grad_log_probs is not None:
                is_target = columns == targets[a:a + chunk].unsqueeze(-1)
                g += grad_log_probs[a:a + chunk].float().unsqueeze(-1) * (is_target.float() - p)
            if grad_entropy is not None:
                g -= grad_entropy[a:a + chunk].float().unsqueeze(-1) * p * (log_p + entropy[a:a + chunk].unsqueeze(-1))
            g = g * inv_t
            if softcap is not None:
                g = g * (1 - t * t)
            g = g * logit_scale  # d loss / d (h w^T + b), this rank's columns
            grad_hidden[a:a + chunk] += g @ w.float()
            grad_weight[:width] += g.t() @ h.float()
            if grad_bias is not None:
                grad_bias[:width] += g.sum(0)
        all_reduce(grad_hidden, head.group)  # every rank's vocabulary slice contributes to the hidden gradient
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)


class _Dispatch:
    """Stands in for TRL's `ChunkedLogProbFunction`: tp_plugin vocabulary shards go to the vocab-parallel
    version, everything else (an unsplit model in the same process) to TRL's own."""

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL):
        ref = getattr(weight, "tp_vocab_head", None)
        head = ref() if ref is not None else None
        if head is None or dist.get_world_size(head.group) == 1:
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        return VocabParallelLogProbs.apply(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                                           logit_scale, tuple(outputs), head)


_MODULE = "trl.trainer.utils"
_ATTR = "_ChunkedLogProbFunction"


def install() -> None:
    """Route TRL's fused LM head through the dispatcher (idempotent; a no-op until TRL is imported)."""
    utils = sys.modules.get(_MODULE)
    if utils is not None:
        patching.wrap(utils, _ATTR, _Dispatch)


def uninstall() -> None:
    utils = sys.modules.get(_MODULE)
    if utils is not None:
        patching.restore(utils, _ATTR)


# ---- online trainers (GRPO, RLOO): gathers over data-parallel replicas ----------------------------------------

@contextmanager
def replica_view(trainer, mesh):
    """While GRPO / RLOO generate, score and normalise, let them see data-parallel replicas, not processes.

    They gather rewards and token counts over every process, slice their own rows back by `process_index`, and
    divide by `num_processes`. The TP ranks of a replica hold the same samples, so a world gather repeats each
    sample tp times: standard deviations (`reward_std`, batch-scaled advantages) and token counts come out
    wrong. For the duration, `accelerator.gather` (and the `gather` the trainer module imported) keep one copy
    per replica, and the accelerator's `num_processes` / `process_index` are the DP size and DP rank.
    """
    acc, state = trainer.accelerator, trainer.accelerator.state
    keep = torch.as_tensor(mesh.mesh.mesh[:, 0])  # global rank of TP rank 0 in each replica, in DP order
    world = dist.get_world_size()

    def one_copy_per_replica(gathered):
        def pick(t):
            if not torch.is_tensor(t):
                return t
            rows = t.reshape(world, -1, *t.shape[1:])[keep.to(t.device)]
            return rows.reshape(-1, *t.shape[1:])
        return torch.utils._pytree.tree_map(pick, gathered)

    module = sys.modules[next(c.__module__ for c in type(trainer).__mro__ if "_generate_and_score_completions"
                              in vars(c) and not c.__module__.startswith("tp_plugin."))]
    module_gather = getattr(module, "gather", None)
    saved = state.num_processes, state.process_index
    acc.gather = lambda tensor: one_copy_per_replica(type(acc).gather(acc, tensor))
    if module_gather is not None:
        module.gather = lambda tensor: one_copy_per_replica(module_gather(tensor))
    state.num_processes, state.process_index = mesh.dp_size, mesh.dp_rank
    try:
        yield
    finally:
        state.num_processes, state.process_index = saved
        del acc.gather
        if module_gather is not None:
            module.gather = module_gather
