"""Vocab-parallel cross-entropy: the loss from vocabulary-sharded logits, never building full logits.

Two all-reduces per call: the max (for a stable softmax), then the sum of exps stacked with the target
logit. Backward is local: softmax minus one-hot on this rank's vocabulary slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .comm import all_reduce


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

        in_range = (target >= vocab_start) & (target < vocab_stop)
        local_target = (target - vocab_start).masked_fill(~in_range, 0)
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
        grad = softmax  # d loss / d logit = softmax - onehot(target)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= in_range.to(grad.dtype)
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, vocab_stop: int,
                                 group: ProcessGroup) -> torch.Tensor:
    """Per-token loss, `[N]`, from this rank's `[N, V_local]` logits. Same value on every TP rank."""
    return _VocabParallelCE.apply(logits, target, vocab_start, vocab_stop, group)


class VocabParallelCausalLMLoss:
    """Drop-in for transformers' `ForCausalLMLoss` (set as `model.loss_function`) on sharded logits.

    Same shift, `ignore_index`, and `num_items_in_batch` (sum / n instead of mean) semantics.
    """

    def __init__(self, vocab_start: int, vocab_stop: int, group: ProcessGroup):
        self.vocab_start, self.vocab_stop, self.group = vocab_start, vocab_stop, group

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs) -> torch.Tensor:
        logits = logits.float()
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        target = shift_labels.reshape(-1).to(logits.device)
        logits = logits.reshape(-1, logits.shape[-1])
        keep = target != ignore_index
        per_token = vocab_parallel_cross_entropy(logits, target.masked_fill(~keep, 0),
                                                 vocab_start=self.vocab_start, vocab_stop=self.vocab_stop,
                                                 group=self.group)
        total = (per_token * keep).sum()
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return total / keep.sum()  # NaN when every label is ignored, like F.cross_entropy's mean
