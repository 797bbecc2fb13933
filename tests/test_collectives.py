"""Count collectives, not only values: a split forward/backward must cost exactly the Megatron minimum."""

from __future__ import annotations

import pytest
import torch

import tp_plugin
from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks
from tests.models import batch, build

def _count(rank, world, arch, loss_parallel):
    model = build(arch, 2)
    tp_plugin.parallelize(model, tp_size=2, loss_parallel=loss_parallel)
    ids = batch()
    with CollectiveCounter() as fwd:
        loss = model(ids, labels=ids).loss
    with CollectiveCounter() as bwd:
        loss.backward()
    return {"layers": model.config.num_hidden_layers, "fwd": dict(fwd.counts), "bwd": dict(bwd.counts)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("loss_parallel", [False, True])
def test_megatron_minimum(arch, loss_parallel):
    for r in run_ranks(2, _count, arch, loss_parallel):
        blocks = r["layers"]
        # forward: the embedding's all-reduce, 2 per block (attention out, MLP down), then the fused head and
        # loss's 2 all-reduces (max; sum-exp stacked with the target logit), in both modes: no all-gather of
        # the logits, which nobody reads
        expected_fwd = {"all_reduce": 1 + 2 * blocks + 2}
        # + one all-gather of two int64 for the one-off first-training-forward check (same batch and RNG state
        # on every TP rank, tp_plugin.checks); later forwards do without it (test_input_checks counts that)
        expected_fwd["all_gather"] = 1
        # backward: 2 per block (the input gradients of attention and MLP) + the LM head's input gradient
        expected_bwd = {"all_reduce": 2 * blocks + 1}
        assert r["fwd"] == expected_fwd
        assert r["bwd"] == expected_bwd


def _count_replicated_kv(rank, world):
    model = build("llama", 4)  # 4 heads / 2 KV heads at tp=4: every KV head is held by two ranks
    tp_plugin.parallelize(model, tp_size=4)
    ids = batch()
    loss = model(ids, labels=ids).loss
    with CollectiveCounter() as bwd:
        loss.backward()
    return dict(bwd.counts)


def test_replicated_kv_costs_one_gradient_sum_per_shared_weight():
    # k_proj and v_proj weights are shared by two ranks each: their gradients need one extra all-reduce each
    # per block (2 blocks) on top of the Megatron minimum (2 per block + 1 for the LM head).
    for counts in run_ranks(4, _count_replicated_kv):
        assert counts == {"all_reduce": 2 * 2 + 1 + 2 * 2}


def _generate(rank, world):
    model = build("llama", 2).eval()
    ref = build("llama", 2).eval()
    tp_plugin.parallelize(model, tp_size=2)
    ids = batch(batch_size=1, seq=5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ref_out = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return out.tolist(), ref_out.tolist()


def test_generate_with_kv_cache_matches_unsplit():
    for out, ref in run_ranks(2, _generate):
        assert out == ref
