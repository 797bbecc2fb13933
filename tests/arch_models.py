"""Tiny seeded models of the families with hand-written policies beyond tests/models.py (no hub downloads).

Head counts exercise the split rules at each tp (as in tests/models.py):
  grouped-query families: tp=2: 9 heads / 3 KV heads (6+3 uneven split); tp=4: 4 heads / 2 KV heads (each KV
  head replicated on two ranks);
  multi-head families: tp=2: 9 heads (5+4); tp=4: 6 heads (2+2+1+1);
  Falcon multi-query: one KV head, replicated on every rank.
Vocab 101 and intermediate size 98 do not divide by 2 or 4 (vocab padding, uneven MLP and expert splits).
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from tests.models import COMMON, HEADS, _perturb

MHA = {2: 9, 4: 6}
NO_DROPOUT = dict(attention_dropout=0.0, hidden_dropout=0.0)


def _gqa(model_type: str, tp: int, **extra):
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **HEADS[tp], **extra})


def _config(arch: str, tp: int):
    heads = MHA[tp]
    # grouped_mm (the default experts kernel) needs I a multiple of 4: 52 -> 28+24 / 16+12+12+12 rows
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=52)
    if arch in ("gemma2", "gemma3_text", "granite", "starcoder2", "olmo2", "cohere"):
        return _gqa(arch, tp, **({"residual_dropout": 0.0, "embedding_dropout": 0.0} if arch == "starcoder2" else {}))
    if arch == "mixtral":
        return _gqa(arch, tp, num_local_experts=4, num_experts_per_tok=2, intermediate_size=52)
    if arch == "qwen2_moe":
        return _gqa(arch, tp, num_experts=4, shared_expert_intermediate_size=98, **moe)  # shared: a dense MLP
    if arch == "qwen3_moe":
        return _gqa(arch, tp, num_experts=4, **moe)
    if arch in ("phi", "phi3"):
        rotary = {"partial_rotary_factor": 0.25} if arch == "phi" else {}
        kw = {k: v for k, v in HEADS[tp].items() if k != "head_dim"}  # head_dim = hidden / heads here
        return transformers.AutoConfig.for_model(arch, **{**COMMON, **kw, **rotary, "resid_pdrop": 0.0,
                                                          "embd_pdrop": 0.0})
    if arch == "gptj":
        return transformers.GPTJConfig(vocab_size=101, n_embd=72, n_head=heads, n_layer=2, n_positions=64,
                                       rotary_dim=4, n_inner=98, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=101, hidden_size=72, num_attention_heads=heads,
                                          num_hidden_layers=2, intermediate_size=98, rotary_pct=0.5,
                                          max_position_embeddings=64, **NO_DROPOUT)
    if arch in ("falcon", "falcon_gqa"):
        gqa = arch == "falcon_gqa"
        # bias=False (the real Falcon's setting): the block adds attention into the MLP output in place
        return transformers.FalconConfig(vocab_size=101, hidden_size=72, num_hidden_layers=2, bias=gqa,
                                         num_attention_heads=HEADS[tp]["num_attention_heads"] if gqa else heads,
                                         num_kv_heads=HEADS[tp]["num_key_value_heads"] if gqa else None,
                                         new_decoder_architecture=gqa, multi_query=not gqa, **NO_DROPOUT)
    if arch == "opt":
        return transformers.OPTConfig(vocab_size=101, hidden_size=72, num_attention_heads=heads, ffn_dim=98,
                                      num_hidden_layers=2, word_embed_proj_dim=72, max_position_embeddings=64,
                                      dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    if arch in ("gpt_bigcode", "gpt_bigcode_mha"):  # StarCoder 1: multi-query (one KV head) or multi-head
        return transformers.GPTBigCodeConfig(vocab_size=101, n_embd=72, n_head=heads, n_layer=2, n_positions=64,
                                             n_inner=98, multi_query=arch == "gpt_bigcode", resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "bloom":
        return transformers.BloomConfig(vocab_size=101, hidden_size=72, n_head=heads, n_layer=2, **NO_DROPOUT)
    if arch in ("bert", "roberta"):
        return transformers.AutoConfig.for_model(arch, vocab_size=101, hidden_size=72, num_attention_heads=heads,
                                                 intermediate_size=98, num_hidden_layers=2,
                                                 max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0, pad_token_id=1)
    raise KeyError(arch)


ENCODERS = ("bert", "roberta")
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "gemma2", "gemma3_text", "phi", "phi3", "gptj", "gpt_neox",
         "falcon", "falcon_gqa", "opt", "bloom", "starcoder2", "olmo2", "cohere", "granite", "bert", "roberta",
         "gpt_bigcode", "gpt_bigcode_mha"]


def build_arch(arch: str, tp: int, seed: int = 0) -> nn.Module:
    """A seeded tiny model: causal LM, or sequence classification (3 labels) for the encoders."""
    torch.manual_seed(seed)
    config = _config(arch, tp)
    config.num_labels = 3
    auto = transformers.AutoModelForSequenceClassification if arch in ENCODERS else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    _perturb(model)
    return model
