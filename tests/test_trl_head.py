"""tp_plugin's vocab-parallel version of TRL's fused LM head against TRL's own `ChunkedLogProbFunction` on the
full weight: every output and every gradient, with temperature, logit scale, soft-capping and a bias.

Tolerance: both sides compute in fp32 and differ only in the order of the vocabulary sums (two shards combined
with one all-reduce instead of one pass); on log-probs of order 5 that is ~1e-6, we allow 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks

ATOL = 1e-5
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _compare(rank, world, softcap, bias, tied_pad):
    from trl.kernels import ChunkedLogProbFunction

    from tp_plugin.integrations.trl import VocabParallelLogProbs
    from tp_plugin.runtime.layers import VocabParallelLMHead
    from tp_plugin.sharding import vocab_specs

    vocab = 101 if tied_pad else 100  # 101 does not divide by 2: the last shard has a padding row
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=gen, requires_grad=True)
    b = torch.randn(vocab, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (23,), generator=gen)
    targets[:3] = torch.tensor([0, vocab // 2, vocab - 1])  # first, boundary and last token
    args = (2.0, softcap, 0.7)  # temperature, soft-capping, logit scale
    ref = ChunkedLogProbFunction.apply(hidden, weight, b, targets, args[0], 16, args[1], args[2], OUTPUTS)

    full = torch.nn.Linear(16, vocab, bias=bias)
    with torch.no_grad():
        full.weight.copy_(weight)
        if bias:
            full.bias.copy_(b)
    head = VocabParallelLMHead(full, vocab_specs(vocab, world)[rank], dist.group.WORLD, tied_weight=None,
                               gather_output=True)
    h = hidden.detach().clone().requires_grad_()
    with CollectiveCounter() as fwd:
        out = VocabParallelLogProbs.apply(h, head.weight, head.bias, targets, *args, OUTPUTS, head)
    errors = {name: (a.float() - r.float()).abs().max().item() for name, a, r in zip(OUTPUTS, out, ref)}
    weights = torch.randn(23, generator=gen), torch.randn(23, generator=gen)
    (ref[0] @ weights[0] + ref[1] @ weights[1]).backward()
    with CollectiveCounter() as bwd:
        (out[0] @ weights[0] + out[1] @ weights[1]).backward()
    start, stop = head.vocab_start, head.vocab_stop
    errors["grad_hidden"] = (h.grad - hidden.grad).abs().max().item()
    errors["grad_weight"] = (head.weight.grad[:stop - start] - weight.grad[start:stop]).abs().max().item()
    if bias:
        errors["grad_bias"] = (head.bias.grad[:stop - start] - b.grad[start:stop]).abs().max().item()
    return errors, dict(fwd.counts), dict(bwd.counts)


@pytest.mark.parametrize("softcap,bias,pad", [(None, False, True), (3.0, True, False)])
def test_vocab_parallel_fused_head_matches_trl(softcap, bias, pad):
    for errors, fwd, bwd in run_ranks(2, _compare, softcap, bias, pad):
        assert max(errors.values()) <= ATOL, errors
        assert fwd == {"all_reduce": 2} and bwd == {"all_reduce": 1}, (fwd, bwd)
