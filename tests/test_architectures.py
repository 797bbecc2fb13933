"""The model zoo: hand-written policies (parity at tp=2 and tp=4), the translated base_model_tp_plan, the
structural fallback, the clear refusal, and a sample of the `tp-plugin verify --all-architectures` sweep.

Tolerances: as tests/test_parity.py (fp32; the split only reorders sums: 1e-5 abs + 1e-5 rel for logits and
loss, 2e-5 for gradients), checked for every family with `_assert_close` from there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tp_plugin
from tests.dist import run_ranks
from tests.models import ENCODERS, FAMILIES, batch, build, max_errors
from tests.test_parity import _assert_close


def _parity_many(rank, world, archs, tp):
    """Every family in one set of ranks (one fork per rank for the whole list keeps the file fast)."""
    results = {}
    for arch in archs:
        model = build(arch, tp)
        ref = copy.deepcopy(model)
        ids = batch()
        labels = torch.tensor([0, 2]) if arch in ENCODERS else ids
        tp_plugin.parallelize(model, tp_size=tp)
        group = model.tp_plugin_state.mesh.tp_group
        out, ref_out = model(ids, labels=labels), ref(ids, labels=labels)
        out.loss.backward()
        ref_out.loss.backward()
        assert out.logits.shape == ref_out.logits.shape, (arch, out.logits.shape, ref_out.logits.shape)
        results[arch] = {"policy": model.tp_plugin_state.plan.policy_name,
                         "loss": (out.loss - ref_out.loss).abs().item(), "ref_loss": ref_out.loss.item(),
                         "logits": (out.logits - ref_out.logits).abs().max().item(),
                         "logits_scale": ref_out.logits.abs().max().item(),
                         "grads": max_errors(model, ref, group)}
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_hand_written_policies_match_unsplit(tp):
    for results in run_ranks(tp, _parity_many, FAMILIES, tp, timeout_s=240):
        for arch in FAMILIES:
            r = results[arch]
            assert "translated" not in r["policy"] and "fallback" not in r["policy"], (arch, r["policy"])
            try:
                _assert_close([r])
            except AssertionError as exc:
                raise AssertionError(f"{arch} at tp={tp}: {exc}") from None


def _falcon_mqa_layout(rank, world):
    """Multi-query Falcon: every rank holds the single KV head (rows [q | k | v] -> its q heads + k + v)."""
    model = build("falcon", world)
    tp_plugin.parallelize(model, tp_size=world)
    qkv = model.transformer.h[0].self_attention.query_key_value
    return qkv.weight.tp_shard.ranges, qkv.shared_rows  # shared rows: their gradient is summed over holders


def test_falcon_multi_query_replicates_the_kv_head():
    results = run_ranks(4, _falcon_mqa_layout)
    hd = 12  # hidden 72 / 6 heads at tp=4; rows: q 0..71, k 72..83, v 84..95
    for ranges, shared in results:
        assert ranges[-2:] == ((72, 84), (84, 96)) and shared, (ranges, shared)
    assert [r[0] for r, _ in results] == [(0, 2 * hd), (2 * hd, 4 * hd), (4 * hd, 5 * hd), (5 * hd, 6 * hd)]


# ---------------------------------------------------------------- the policy chain for unregistered models

def _chain(rank, world, model_type, expect):
    from tp_plugin.tools.verify import check_one

    result = check_one(model_type, world)
    return result.status, result.how, result.detail, result.errors


@pytest.mark.parametrize("model_type,how", [
    ("arcee", "translated plan"),      # base_model_tp_plan with colwise/rowwise
    ("deepseek_v3", "translated plan"),  # fused 3-D experts (moe_tp_experts) + shared experts
    ("biogpt", "fallback"),            # no tp_plan: structural fallback
    ("xglm", "fallback"),
    ("openai-gpt", "fallback"),        # GPT-style Conv1D projections found structurally
])
def test_sweep_sample_matches(model_type, how):
    """A sample of `tp-plugin verify --all-architectures`, through the same code path (tiny config, split,
    compare logits/loss/grads within verify.TOL)."""
    for status, got_how, detail, errors in run_ranks(2, _chain, model_type, how):
        assert (status, got_how) == ("match", how), (model_type, status, got_how, detail, errors)


def test_translation_of_every_style_name():
    from tp_plugin.styles import Experts, HeadColwise, HeadRowwise
    from tp_plugin.auto import translate_tp_plan
    from tp_plugin.tools.verify import build_tiny

    model = build_tiny("qwen3_moe")
    policy = translate_tp_plan(model)
    assert isinstance(policy.layers["layers.*.mlp.experts"], Experts)
    assert isinstance(policy.layers["layers.*.self_attn.q_proj"], HeadColwise)
    assert policy.layers["layers.*.self_attn.k_proj"].kind == "kv"  # 2 KV heads of 4: found from the width
    assert isinstance(policy.layers["layers.*.self_attn.o_proj"], HeadRowwise)
    # a plan that gathers q/k/v (OLMo2's full-width norms need the full activation) keeps attention whole
    olmo = translate_tp_plan(build_tiny("olmo2"))
    assert olmo.attention is None and "layers.*.self_attn.q_proj" in olmo.replicate
    # names from older releases and expert-parallel-only styles are known; an unknown one is an error
    plan = {"layers.*.self_attn.q_proj": "local_colwise", "layers.*.self_attn.k_proj": "local_colwise",
            "layers.*.self_attn.v_proj": "local_colwise", "layers.*.self_attn.o_proj": "local_rowwise",
            "layers.*.mlp.gate_proj": "colwise_rep", "layers.*.mlp.up_proj": "isolated",
            "layers.*.mlp.down_proj": "gather", "embed_tokens": "embedding_rowwise", "norm": "sequence_parallel"}
    llama = build_tiny("llama")
    policy = translate_tp_plan(llama, plan)
    assert policy.attention is not None and "layers.*.mlp.gate_proj" in policy.replicate
    with pytest.raises(tp_plugin.TPSplitError, match="unknown tp_plan style 'diagonal'"):
        translate_tp_plan(llama, {**plan, "layers.*.mlp.gate_proj": "diagonal"})


class _Opaque(nn.Module):
    """A model with no policy, no tp_plan and no repeated blocks."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "opaque_net", "hidden_size": 8})()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return None


def test_unsplittable_model_gets_a_clear_error():
    from tp_plugin.auto import auto_policy

    with pytest.raises(tp_plugin.TPSplitError, match=r"opaque_net.*no repeated blocks.*register_policy\('opaque_net'"):
        auto_policy(_Opaque())  # what parallelize() calls for a model_type with no registered policy
