"""The causal-LM loss of a split model, computed so that nothing of the full `[tokens, vocabulary]` size is kept
for backward.

* `loss_parallel=True`: in training mode `.logits` is this rank's vocabulary shard and the loss is vocab-parallel
  (`VocabParallelCE`): two small all-reduces (the max for a stable softmax, then the sum of exps stacked with the
  target logit). In eval mode the head returns the full logits, and the loss is the default mode's.
* The default: `.logits` are the full logits, all-gathered as before, and they carry their shard
  (`tp_vocab_shard`). The loss takes its value from the full logits (no extra collective) and sends its gradient
  straight to the shard (`GatheredLogitsCE`), so it keeps only the shard and one number per token for backward,
  where transformers' cross-entropy keeps a full-vocabulary log-softmax and builds a full-vocabulary gradient.
  Logits that a model transforms before its loss (Gemma's soft-capping) carry no shard: transformers' own loss
  runs on them, as without tensor parallelism.

Backward is local in both: softmax minus one-hot on this rank's vocabulary slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .comm import all_reduce


def _softmax_minus_onehot(softmax: torch.Tensor, local_target, in_range, grad_loss) -> torch.Tensor:
    """d loss / d logits on this rank's slice, in place on `softmax` ([N, V_local])."""
    rows = torch.arange(softmax.shape[0], device=softmax.device)
    softmax[rows, local_target] -= in_range.to(softmax.dtype)
    return softmax.mul_(grad_loss.unsqueeze(-1))


def _local_target(target, vocab_start, vocab_stop):
    in_range = (target >= vocab_start) & (target < vocab_stop)
    return (target - vocab_start).masked_fill(~in_range, 0), in_range


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_stop, group):
        # logits: [N, V_local] float; target: [N] global ids (ignored positions already remapped by the caller)
        local_width = vocab_stop - vocab_start
        if local_width < logits.shape[-1]:  # padded vocabulary rows never win
            logits = logits.clone()
            logits[:, local_width:] = float("-inf")
        logits_max = logits.max(dim=-1).values
        all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        local_target, in_range = _local_target(target, vocab_start, vocab_stop)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)
        exp = shifted.exp()
        stats = torch.stack([exp.sum(dim=-1), target_logit])  # [2, N]: one all-reduce for both
        all_reduce(stats, group)
        sum_exp, target_logit = stats
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, in_range)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_range = ctx.saved_tensors
        return _softmax_minus_onehot(softmax, local_target, in_range, grad_loss), None, None, None, None


class _GatheredLogitsCE(torch.autograd.Function):
    """Per-token loss whose value comes from the gathered `[..., V]` logits and whose gradient goes to this rank's
    `[N, V_local]` shard of them (the gathered tensor gets none: every rank's shard gets its own part). `full` is
    read as it is: with a padded vocabulary it is a strided view, which flattening would copy whole."""

    @staticmethod
    def forward(ctx, shard, full, target, vocab_start, vocab_stop):
        # log-sum-exp in chunks of positions: its exp temporary stays the size of one shard
        rows = max(1, full.shape[-2] * shard.shape[-1] // max(1, full.shape[-1]))
        lse = torch.cat([torch.logsumexp(part.float(), dim=-1) for part in full.split(rows, dim=-2)], dim=-1)
        lse = lse.reshape(-1)
        target_logit = full.gather(-1, target.view(full.shape[:-1]).unsqueeze(-1)).reshape(-1).float()
        local_target, in_range = _local_target(target, vocab_start, vocab_stop)
        ctx.width = vocab_stop - vocab_start
        ctx.save_for_backward(shard, lse, local_target, in_range)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        shard, lse, local_target, in_range = ctx.saved_tensors
        softmax = (shard.float() - lse.unsqueeze(-1)).exp_()
        softmax[:, ctx.width:] = 0.0  # padded vocabulary rows: not logits of any token
        grad = _softmax_minus_onehot(softmax, local_target, in_range, grad_loss)
        return grad.to(shard.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, vocab_stop: int,
                                 group: ProcessGroup) -> torch.Tensor:
    """Per-token loss, `[N]`, from this rank's `[N, V_local]` logits. Same value on every TP rank."""
    return _VocabParallelCE.apply(logits, target, vocab_start, vocab_stop, group)


def _causal_lm_loss(per_token, labels, device, *, num_items_in_batch, ignore_index: int,
                    shift_labels) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` semantics (shift, `ignore_index`, sum / `num_items_in_batch` or mean) around
    a per-token cross-entropy `per_token(target)` of the flattened positions (on the logits' `device`)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(device)
    keep = target != ignore_index
    total = (per_token(target.masked_fill(~keep, 0)) * keep).sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / keep.sum()  # NaN when every label is ignored, like F.cross_entropy's mean


class VocabParallelCausalLMLoss:
    """Drop-in for transformers' `ForCausalLMLoss` (set as `model.loss_function`) on sharded logits; the full logits
    an eval-mode forward returns go to `full` (the default mode's loss)."""

    def __init__(self, vocab_start: int, vocab_stop: int, group: ProcessGroup, vocab_size: int, full):
        self.vocab_start, self.vocab_stop, self.group = vocab_start, vocab_stop, group
        self.vocab_size, self.full = vocab_size, full

    @property
    def fallback(self):  # the model's own loss function (kept through a resize, like the default mode's)
        return self.full.fallback

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs) -> torch.Tensor:
        if logits.shape[-1] == self.vocab_size:  # a shard is narrower than the vocabulary whenever tp > 1
            return self.full(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
                             ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        logits = logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        return _causal_lm_loss(
            lambda target: vocab_parallel_cross_entropy(flat, target, vocab_start=self.vocab_start,
                                                        vocab_stop=self.vocab_stop, group=self.group),
            labels, flat.device, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
            shift_labels=shift_labels)


class GatheredLogitsCausalLMLoss:
    """`model.loss_function` of the default mode: on gathered logits that carry their shard, the loss with the
    shard-only backward; on anything else, `fallback` (the model's own loss function)."""

    def __init__(self, vocab_start: int, vocab_stop: int, fallback):
        self.vocab_start, self.vocab_stop, self.fallback = vocab_start, vocab_stop, fallback

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs) -> torch.Tensor:
        shard = getattr(logits, "tp_vocab_shard", None)
        if shard is None:
            return self.fallback(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        full, shard = logits.detach(), shard.reshape(-1, shard.shape[-1])
        return _causal_lm_loss(
            lambda target: _GatheredLogitsCE.apply(shard, full, target, self.vocab_start, self.vocab_stop),
            labels, full.device, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
            shift_labels=shift_labels)
