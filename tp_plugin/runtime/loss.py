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
* `fused_vocab_parallel_cross_entropy`: the head's matmul and the loss in one, for a caller that holds the
  hidden states and this rank's head shard; no logits of the full vocabulary, nor of this rank's shard, are
  ever whole:

      forward, each chunk of C tokens     logits_c = h_c W_local^T (+ b)        [C, V_local], then dropped
                                          this rank's log-sum-exp and target logit (and, with label smoothing,
                                          its sum of logits) of the chunk          [C] each
      after the chunks                    all-reduce MAX of the local log-sum-exps, then one all-reduce SUM of
                                          [exp(lse_r - max), target logit, logit sum]: 2 collectives in all,
                                          of [tokens] floats, however many chunks
      backward, each chunk                logits_c recomputed; softmax_c - one-hot (the local slice);
                                          dh_c = g_c W_local (a partial sum over the vocabulary: the caller's
                                          `copy_to_tp` all-reduces it once), dW_local += g_c^T h_c

  Soft-capping (`cap * tanh(logits / cap)`, Gemma 2) is applied to each chunk's logits and differentiated through;
  label smoothing follows `F.cross_entropy(label_smoothing=eps)`: (1 - eps) * NLL + eps * mean over the vocabulary
  of -log p. Padded vocabulary rows (`vocab_stop - vocab_start` < the shard's rows) are never logits of any token.

Backward is local in all three: softmax minus one-hot on this rank's vocabulary slice.
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


# ---- the head and the loss fused, in chunks of tokens ----------------------------------------------------------

CHUNK_TOKENS = 1024


def _chunk_logits(h, weight, bias, width, softcap):
    """This chunk's logits (float32) on this rank's real vocabulary rows; with soft-capping, also tanh(z / cap)."""
    logits = torch.nn.functional.linear(h, weight[:width], None if bias is None else bias[:width])
    logits = logits.to(_stats_dtype(logits.dtype))
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float32 at least (bf16 / fp16 logits), or the inputs' precision when higher."""
    return torch.promote_types(dtype, torch.float32)


class _FusedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, vocab_start, vocab_stop, vocab_size, group, softcap, smoothing,
                chunk):
        # hidden: [N, H] (replicated over TP); weight: [V_local, H] (rows past vocab_stop - vocab_start: padding);
        # target: [N] global ids, valid everywhere (ignored positions remapped by the caller, masked after)
        width = vocab_stop - vocab_start
        n = hidden.shape[0]
        lse = hidden.new_empty(n, dtype=_stats_dtype(hidden.dtype))
        stats = hidden.new_zeros(3 if smoothing else 2, n, dtype=lse.dtype)  # [exp-sum, target logit, sum]
        in_range = (target >= vocab_start) & (target < vocab_stop)
        local_target = (target - vocab_start).masked_fill(~in_range, 0)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            logits, _ = _chunk_logits(hidden[rows], weight, bias, width, softcap)
            picked = logits.gather(-1, local_target[rows].unsqueeze(-1)).squeeze(-1)
            stats[1, rows] = picked.masked_fill(~in_range[rows], 0.0)
            if smoothing:
                stats[2, rows] = logits.sum(dim=-1)
            top = logits.max(dim=-1).values  # log-sum-exp in place: no second chunk-sized temporary
            lse[rows] = logits.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1).log_().add_(top)
            del logits  # before the next chunk's exists: one chunk at a time
        top = all_reduce(lse.clone(), group, op=dist.ReduceOp.MAX)
        stats[0] = (lse - top).exp()
        stats = all_reduce(stats, group)
        lse = stats[0].log() + top  # the log-sum-exp over the whole vocabulary
        loss = lse - stats[1]
        if smoothing:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - stats[2] / vocab_size)
        ctx.save_for_backward(hidden, weight, bias, lse, local_target, in_range)
        ctx.width, ctx.softcap, ctx.smoothing, ctx.vocab_size, ctx.chunk = width, softcap, smoothing, vocab_size, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, lse, local_target, in_range = ctx.saved_tensors
        width, softcap, smoothing = ctx.width, ctx.softcap, ctx.smoothing
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk):
            rows = slice(start, min(n, start + ctx.chunk))
            h, g = hidden[rows], grad_loss[rows].to(lse.dtype)
            logits, tanh = _chunk_logits(h, weight, bias, width, softcap)
            grad = logits.sub_(lse[rows].unsqueeze(-1)).exp_()  # softmax on this rank's slice, in place
            picked = torch.arange(grad.shape[0], device=grad.device)
            grad[picked, local_target[rows]] -= (1.0 - smoothing) * in_range[rows].to(grad.dtype)
            if smoothing:
                grad.sub_(smoothing / ctx.vocab_size)
            grad.mul_(g.unsqueeze(-1))
            if softcap is not None:
                grad.mul_(1.0 - tanh * tanh)
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight[:width]
            if grad_weight is not None:
                grad_weight[:width].addmm_(grad.t(), h)  # in place: no weight-sized temporary per chunk
            if grad_bias is not None:
                grad_bias[:width] += grad.sum(dim=0)
            del logits, tanh, grad
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def fused_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                       target: torch.Tensor, *, vocab_start: int, vocab_stop: int, vocab_size: int,
                                       group, softcap: float | None = None, label_smoothing: float = 0.0,
                                       chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Per-token loss `[N]` from `hidden` `[N, H]` and this rank's head shard; the same value on every TP rank.
    The input gradient is this rank's partial sum: pass `hidden` through `comm.copy_to_tp` first."""
    return _FusedVocabParallelCE.apply(hidden, weight, bias, target, vocab_start, vocab_stop, vocab_size, group,
                                       softcap, label_smoothing, chunk_tokens)
