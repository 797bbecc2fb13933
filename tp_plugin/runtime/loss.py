"""The causal-LM loss of a split model: computed from the hidden states and this rank's LM-head shard, so that
nothing of the full `[tokens, vocabulary]` size (nor `[tokens, vocabulary / tp]`) ever exists whole.

* `CausalLMLoss` is the model's `loss_function` (transformers' `ForCausalLMLoss` semantics: shift, `ignore_index`,
  `num_items_in_batch`). Given the `logits.DeferredLogits` of a training forward, it runs the fused kernel below
  on their hidden states, with the transforms the model applied to them (soft-capping, scaling). Given a
  vocabulary shard (loss-parallel logits that were read, or computed eagerly), or full logits computed for
  training (they carry their shard, `tp_vocab_shard`), it runs the same kernel on the shard: its gradient goes
  to the shard, never through a full-vocabulary one. Given other full logits (eval mode, or logits a model
  transformed before its loss), the model's own loss function runs on them, as without tensor parallelism.
* `fused_vocab_parallel_cross_entropy`: the head's matmul and the loss in one, for a caller that holds the
  hidden states and this rank's head shard:

      forward, each chunk of C tokens     logits_c = h_c W_local^T (+ b), then the model's transforms
                                          [C, V_local], then dropped
                                          this rank's log-sum-exp and target logit (and, with label smoothing,
                                          its sum of logits) of the chunk          [C] each
      after the chunks                    all-reduce MAX of the local log-sum-exps, then one all-reduce SUM of
                                          [exp(lse_r - max), target logit, logit sum]: 2 collectives in all,
                                          of [tokens] floats, however many chunks
      backward, each chunk                logits_c recomputed; softmax_c - one-hot (the local slice), through
                                          the transforms; dh_c = g_c W_local (a partial sum over the
                                          vocabulary: the caller's `copy_to_tp` all-reduces it once),
                                          dW_local += g_c^T h_c

  Transforms are elementwise and applied in float32, in the model's order: ("mul", s), ("div", s), ("tanh",
  None); soft-capping `cap * tanh(logits / cap)` (Gemma 2) is ("div", cap), ("tanh", None), ("mul", cap).
  Label smoothing follows `F.cross_entropy(label_smoothing=eps)`: (1 - eps) * NLL + eps * mean over the
  vocabulary of -log p. Padded vocabulary rows (`vocab_stop - vocab_start` < the shard's rows) are never logits
  of any token. With `weight=None`, `hidden` is taken to be the shard's logits themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .comm import all_reduce, copy_to_tp
from .devices import autocast_dtype
from .logits import DeferredLogits


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


class CausalLMLoss:
    """`model.loss_function` of a split model whose own is transformers' causal-LM loss (kept as `fallback`, which
    runs on full logits)."""

    def __init__(self, head, fallback):
        self.head, self.fallback = head, fallback

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs) -> torch.Tensor:
        head = self.head
        deferred = isinstance(logits, DeferredLogits) and logits._value is None and logits.source.head is head
        if deferred:
            # the weight the head's forward saw (PEFT's token adapter hands it a written copy through
            # functional_call; FSDP2 swaps the attribute back to its shard after the forward)
            source = logits.source
            flat = copy_to_tp(source.hidden.reshape(-1, source.hidden.shape[-1]), head.group)
            weight, bias, ops = source.weight, source.bias, logits.ops
        elif getattr(logits, "tp_vocab_shard", None) is not None:  # full logits computed for training: their shard
            shard = logits.tp_vocab_shard
            flat, weight, bias, ops = shard.reshape(-1, shard.shape[-1]), None, None, ()
        elif logits.shape[-1] != head.spec.full_size:  # a vocabulary shard: narrower whenever tp > 1
            flat, weight, bias, ops = logits.reshape(-1, logits.shape[-1]), None, None, ()
        else:
            return self.fallback(logits, labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        return _causal_lm_loss(
            lambda target: fused_vocab_parallel_cross_entropy(
                flat, weight, bias, target, vocab_start=head.vocab_start, vocab_stop=head.vocab_stop,
                vocab_size=head.spec.full_size, group=head.group, ops=ops),
            labels, flat.device, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
            shift_labels=shift_labels)


# ---- the head and the loss fused, in chunks of tokens ----------------------------------------------------------

CHUNK_TOKENS = 1024


def softcap_ops(cap: float | None) -> tuple:
    """Soft-capping `cap * tanh(logits / cap)` as transforms, in the order Gemma 2 applies it."""
    return () if cap is None else (("div", cap), ("tanh", None), ("mul", cap))


def _chunk_logits(h, weight, bias, width, dtype, ops, *, keep_tanh: bool):
    """This chunk's logits in float32 (or higher) on this rank's real vocabulary rows, transformed, plus the
    tanh outputs backward needs. `weight` None: `h` is the chunk's logits (copied: they are changed in place)."""
    if weight is None:
        logits = h[:, :width].to(_stats_dtype(h.dtype), copy=True)
    else:
        logits = F.linear(h.to(dtype), weight[:width].to(dtype), None if bias is None else bias[:width].to(dtype))
        logits = logits.to(_stats_dtype(logits.dtype))
    tanhs = []
    for op, number in ops:
        if op == "mul":
            logits.mul_(number)
        elif op == "div":
            logits.div_(number)
        else:
            logits.tanh_()
            if keep_tanh:
                tanhs.append(logits.clone())
    return logits, tanhs


def _through_ops(grad, ops, tanhs):
    """d loss / d (untransformed logits), in place on `grad` (the tanh outputs are used up)."""
    for op, number in reversed(ops):
        if op == "mul":
            grad.mul_(number)
        elif op == "div":
            grad.div_(number)
        else:
            tanh = tanhs.pop()
            grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    return grad


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float32 at least (bf16 / fp16 logits), or the inputs' precision when higher."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's when the forward runs under it (backward, which runs outside, uses the
    same), else the hidden states'."""
    return autocast_dtype(hidden.device.type) or hidden.dtype


class _FusedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, vocab_start, vocab_stop, vocab_size, group, ops, smoothing,
                chunk):
        # hidden: [N, H] (replicated over TP), or [N, V_local] logits when weight is None; weight: [V_local, H]
        # (rows past vocab_stop - vocab_start: padding); target: [N] global ids, valid everywhere (ignored
        # positions remapped by the caller, masked after)
        width, dtype = vocab_stop - vocab_start, _compute_dtype(hidden)
        n = hidden.shape[0]
        if hidden.is_meta:  # shapes only (the planner's memory model): one chunk, not a Python loop over many
            chunk = max(n, 1)
        lse = hidden.new_empty(n, dtype=_stats_dtype(dtype))
        stats = hidden.new_zeros(3 if smoothing else 2, n, dtype=lse.dtype)  # [exp-sum, target logit, sum]
        in_range = (target >= vocab_start) & (target < vocab_stop)
        local_target = (target - vocab_start).masked_fill(~in_range, 0)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            logits, _ = _chunk_logits(hidden[rows], weight, bias, width, dtype, ops, keep_tanh=False)
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
        ctx.width, ctx.dtype, ctx.ops, ctx.smoothing, ctx.vocab_size, ctx.chunk = \
            width, dtype, ops, smoothing, vocab_size, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, lse, local_target, in_range = ctx.saved_tensors
        width, smoothing = ctx.width, ctx.smoothing
        grad_hidden = (torch.zeros_like if weight is None else torch.empty_like)(hidden) \
            if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk):
            rows = slice(start, min(n, start + ctx.chunk))
            h, g = hidden[rows], grad_loss[rows].to(lse.dtype)
            logits, tanhs = _chunk_logits(h, weight, bias, width, ctx.dtype, ctx.ops, keep_tanh=True)
            grad = logits.sub_(lse[rows].unsqueeze(-1)).exp_()  # softmax on this rank's slice, in place
            picked = torch.arange(grad.shape[0], device=grad.device)
            grad[picked, local_target[rows]] -= (1.0 - smoothing) * in_range[rows].to(grad.dtype)
            if smoothing:
                grad.sub_(smoothing / ctx.vocab_size)
            grad = _through_ops(grad.mul_(g.unsqueeze(-1)), ctx.ops, tanhs)
            if weight is None:  # the logits were given: their gradient is this one
                if grad_hidden is not None:
                    grad_hidden[rows, :width] = grad
                continue
            grad = grad.to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight[:width].to(ctx.dtype)
            if grad_weight is not None:
                grad_weight[:width].addmm_(grad.t().to(weight.dtype), h.to(weight.dtype))  # in place: no
            if grad_bias is not None:                                                   # weight-sized temporary
                grad_bias[:width] += grad.sum(dim=0).to(bias.dtype)
            del logits, grad
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def fused_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                       target: torch.Tensor, *, vocab_start: int, vocab_stop: int, vocab_size: int,
                                       group: ProcessGroup, softcap: float | None = None, ops: tuple = (),
                                       label_smoothing: float = 0.0, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Per-token loss `[N]` from `hidden` `[N, H]` and this rank's head shard (or, `weight=None`, from this rank's
    `[N, V_local]` logits); the same value on every TP rank. `ops`: the model's transforms of the logits, then
    `softcap`. The input gradient is this rank's partial sum: pass `hidden` through `comm.copy_to_tp` first."""
    return _FusedVocabParallelCE.apply(hidden, weight, bias, target, vocab_start, vocab_stop, vocab_size, group,
                                       tuple(ops) + softcap_ops(softcap), label_smoothing, chunk_tokens)
