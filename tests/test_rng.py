"""Random numbers on a split model: per-rank seeds (the DDP habit `seed + rank`) cannot make sampling in
`generate()` or dropout in training diverge across TP ranks, sampling with the same seed gives the unsplit
model's tokens, and the CUDA generator is synchronised from TP rank 0 like the CPU one (that one needs CUDA and
runs in the GPU check). The per-rank stream on its own: test_regions.py; under sequence parallelism:
test_sequence_parallel_rng.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build


def _per_rank_seeds(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model.eval()
    torch.manual_seed(1234 + rank)  # the DDP habit: seed + rank
    out = model.generate(batch(batch_size=2, seq=5), do_sample=True, max_new_tokens=8, top_k=0,
                         pad_token_id=0)
    # and dropout in training: the first training forward gives every rank TP rank 0's state again
    torch.manual_seed(99 + rank)
    model.train()
    model(batch(), labels=batch())
    return out, torch.rand(3)


def test_per_rank_seeds_cannot_make_sampling_or_dropout_diverge():
    (out0, r0), (out1, r1) = run_ranks(2, _per_rank_seeds)
    assert torch.equal(out0, out1), (out0, out1)
    assert torch.equal(r0, r1), (r0, r1)


def _sampling_matches_unsplit(rank, world):
    ref = build("llama", 2)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    ref.eval(), model.eval()
    prompt = batch(batch_size=2, seq=5)
    torch.manual_seed(7)
    ref_out = ref.generate(prompt, do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0)
    torch.manual_seed(7)
    out = model.generate(prompt, do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0)
    return torch.equal(out, ref_out)


def test_same_seed_sampling_equals_the_unsplit_model():
    assert all(run_ranks(2, _sampling_matches_unsplit))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU check)")
def test_cuda_rng_state_is_synchronised():
    def _rank(rank, world):
        torch.cuda.manual_seed(rank)
        torch.cuda.init()
        from tp_plugin.runtime import rng

        rng.sync_from_tp_rank0(dist.group.WORLD)
        return torch.rand(4, device="cuda").cpu()

    a, b = run_ranks(2, _rank)
    assert torch.equal(a, b)
