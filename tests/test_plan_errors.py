"""`tp_plugin.plan` on bad input and at its edges, no ranks: TPSplitError through `resolve_plan` naming the
module, the numbers and the fix; embeddings that do more than a lookup kept whole; regions inferred when a policy
declares none. The models and helpers are `tests/plan_cases.py`'s.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import transformers
from torch import nn

import tp_plugin
from tests.models import build
from tests.plan_cases import (CASES, HIDDEN, INTER, LAYERS, VOCAB, all_in, deal, expected_rank_parameters, plan_error,
                              resolved)
from tp_plugin.plan import plain_lookup, resolve_plan
from tp_plugin.sharding import TPSplitError
from tp_plugin.split import policy_for
from tp_plugin.styles import Colwise, Rowwise, VocabEmbedding, VocabLMHead


# ---- bad input: TPSplitError through resolve_plan, naming the module, the numbers, the fix ---------------------

def test_more_ranks_than_kv_heads_not_a_multiple_of_them():
    model, _ = resolved("llama", 2)  # 9 heads / 3 KV heads
    message = plan_error(model, policy_for(model, 4), 4)
    all_in(message, "llama attention (layers.*.self_attn)", "9 query heads / 3 KV heads cannot be split over 4 ranks",
            "tp must be a multiple of the KV heads (3)", "every tp <= 3")


def test_too_few_query_heads_per_kv_group_for_the_ranks():
    model, _ = resolved("llama", 4)  # 4 heads / 2 KV heads: groups of 2 query heads, tp=8 wants 8 / 2 = 4 each
    message = plan_error(model, policy_for(model, 8), 8)
    all_in(message, "llama attention (layers.*.self_attn)", "4 query heads / 2 KV heads cannot be split over 8 ranks",
            "each KV group's 2 query heads must cover tp/kv = 4 ranks", "every tp <= 2")


def test_more_ranks_than_heads():
    model, _ = resolved("gpt2", 2)  # 9 heads, multi-head
    message = plan_error(model, policy_for(model, 10), 10)
    all_in(message, "gpt2 attention (h.*.attn)", "9 query heads / 9 KV heads cannot be split over 10 ranks",
            "every tp <= 9")


def test_an_mlp_narrower_than_the_degree():
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=3, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    model = transformers.LlamaForCausalLM(config)  # 4 heads split over 4 ranks, 3 MLP rows do not
    message = plan_error(model, policy_for(model, 4), 4)
    all_in(message, "model.layers.0.mlp.gate_proj (3 features)", "size 3 cannot be split over 4 ranks",
            "Use a tensor-parallel size of at most 3")


def test_a_policy_pattern_matching_no_module():
    model, _ = resolved("llama", 2)
    policy = policy_for(model, 2)
    policy = replace(policy, layers={**policy.layers, "layers.*.mlp.fc9": Colwise()})
    all_in(plan_error(model, policy, 2), "policy 'llama'", "pattern 'layers.*.mlp.fc9' matches no module of "
            "LlamaForCausalLM", "the policy does not fit this model")


def test_a_policy_value_that_is_not_a_style():
    model, _ = resolved("llama", 2)
    policy = policy_for(model, 2)
    policy = replace(policy, layers={**policy.layers, "layers.*.mlp.down_proj": "rowwise"})
    message = plan_error(model, policy, 2)
    all_in(message, "'layers.*.mlp.down_proj' maps to 'rowwise', which is not a style", "tp_plugin.styles")
    listed = message.rpartition("tp_plugin.styles: ")[2].split(", ")
    assert "Colwise" in listed and "Rowwise" in listed and "Style" not in listed and "ColumnStyle" not in listed


def test_a_linear_layer_left_unassigned_and_the_replicate_fix():
    model, _ = resolved("llama", 2)
    policy = policy_for(model, 2)
    without = {k: v for k, v in policy.layers.items() if not k.endswith("down_proj")}
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(LAYERS)]
    message = plan_error(model, replace(policy, layers=without), 2)
    all_in(message, "policy 'llama' leaves 2 linear layer(s) unassigned", *downs, "`layers` (Colwise/Rowwise)",
            "`replicate`")
    # the fix the message names: keep them whole on purpose
    plan = resolve_plan(model, replace(policy, layers=without, replicate=("layers.*.mlp.down_proj",)), 2)
    assert plan.kept_whole == downs
    assert [f"{p}.weight" for p in downs] == [n for n in plan.replicated if "down_proj" in n]
    assert plan.num_parameters == model.num_parameters()
    split = expected_rank_parameters("llama", CASES["llama", 2], 2, True)
    whole = [LAYERS * HIDDEN * (INTER - rows) for rows in deal(INTER, 2)]  # the rest of down_proj on each rank
    assert plan.rank_parameters == [s + w for s, w in zip(split, whole)]
    assert "linear layers kept whole (replicated, not split): 2" in str(plan)


def test_a_projection_whose_width_does_not_fit_its_parts():
    model, _ = resolved("llama", 2)  # 9 heads x 8 = 72 query features; the MLP is 98 wide
    policy = policy_for(model, 2)
    column = replace(policy, layers={**policy.layers, "layers.*.mlp.gate_proj": Colwise("q")})
    all_in(plan_error(model, column, 2), "model.layers.0.mlp.gate_proj: 98 output features do not fit the parts ('q',)",
            "(heads take 72)")
    row = replace(policy, layers={**policy.layers, "layers.*.mlp.down_proj": Rowwise("q")})
    all_in(plan_error(model, row, 2), "model.layers.0.mlp.down_proj: 98 input features, but 9 heads x 8 = 72")


def test_head_styles_in_a_policy_without_attention():
    model, _ = resolved("llama", 2)
    policy = replace(policy_for(model, 2), attention=None)
    all_in(plan_error(model, policy, 2), "model.layers.0.self_attn.q_proj: style Colwise('q') splits by heads",
            "the policy declares no attention")


def test_an_input_embedding_that_is_not_an_nn_embedding():
    model = build("llama", 2)
    model.model.embed_tokens = nn.Sequential(nn.Embedding(VOCAB, HIDDEN))
    all_in(plan_error(model, policy_for(model, 2), 2), "LlamaForCausalLM: no nn.Embedding input embedding found",
            "get_input_embeddings() returned Sequential")


# ---- embeddings: plain lookups split, anything more kept whole -------------------------------------------------

class _NormedEmbedding(nn.Embedding):
    """A lookup followed by a norm (as Inkling's): not what VocabParallelEmbedding computes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.norm = nn.LayerNorm(self.embedding_dim)

    def forward(self, ids):
        return self.norm(super().forward(ids))


class _ScaledWithChild(nn.Embedding):
    def __init__(self, *args):
        super().__init__(*args)
        self.embed_scale = 2.0
        self.extra = nn.Linear(self.embedding_dim, self.embedding_dim)

    def forward(self, ids):
        return self.extra(super().forward(ids)) * self.embed_scale


class _Subclass(nn.Embedding):  # nn.Embedding's own forward
    pass


def test_plain_lookup():
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    assert plain_lookup(nn.Embedding(VOCAB, HIDDEN))
    assert plain_lookup(_Subclass(VOCAB, HIDDEN))
    assert plain_lookup(GemmaTextScaledWordEmbedding(VOCAB, HIDDEN, 0, embed_scale=HIDDEN ** 0.5))  # a scaled lookup
    assert not plain_lookup(_NormedEmbedding(VOCAB, HIDDEN))
    assert not plain_lookup(_ScaledWithChild(VOCAB, HIDDEN))  # a scale, but a module that does more


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_an_embedding_doing_more_than_a_lookup_is_kept_whole(tied):
    model = build("llama", 2, tied=tied)
    embed = _NormedEmbedding(VOCAB, HIDDEN)
    if tied:
        embed.weight = model.lm_head.weight
    model.model.embed_tokens = embed
    plan = resolve_plan(model, policy_for(model, 2), 2)
    vocab = [e.path for e in plan.entries if isinstance(e.style, (VocabEmbedding, VocabLMHead))]
    assert vocab == ([] if tied else ["lm_head"])  # a head tied to a whole embedding stays whole with it
    assert "model.embed_tokens.weight" in plan.replicated
    assert plan.num_parameters == model.num_parameters()


# ---- regions inferred when a policy declares none ------------------------------------------------------------

def test_regions_are_inferred_for_a_policy_that_declares_none():
    model, declared = resolved("llama", 2)
    plan = resolve_plan(model, replace(policy_for(model, 2), regions=()), 2)
    want = {f"model.layers.{i}.{m}" for i in range(LAYERS) for m in ("self_attn", "mlp")}  # never a whole layer
    assert set(plan.inferred_regions) == want and plan.regions == plan.inferred_regions
    assert len(plan.inferred_regions) == len(want)
    assert {e.path: e.sync_input_grad for e in plan.entries} == {e.path: e.sync_input_grad for e in declared.entries}
    assert f"regions (one input reduction for the column layers inside): {len(want)}, {len(want)} inferred" in str(plan)


def test_a_head_count_the_config_does_not_have():
    """GPT-2's policy reads `config.n_head`; a Llama config has no such attribute."""
    model, _ = resolved("llama", 2)
    gpt2_policy = policy_for(resolved("gpt2", 2)[0], 2)
    message = plan_error(model, gpt2_policy, 2)
    all_in(message, "h.*.attn", "config.n_head", "LlamaConfig", "AttentionSpec(num_heads=...)")


@pytest.mark.parametrize("tp_size", [0, -2, 2.0])
def test_a_degree_that_is_not_a_positive_integer(tp_size):
    with pytest.raises(TPSplitError) as info:
        tp_plugin.parallelize(build("llama", 2), tp_size=tp_size)
    all_in(str(info.value), f"tp_size={tp_size!r}", "positive integer")
