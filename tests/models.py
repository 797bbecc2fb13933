"""Tiny seeded models of every family the tests split (no hub downloads), and helpers to compare split vs. unsplit.

Head counts exercise the split rules at each tp:
  grouped-query families: tp=2: 9 heads / 3 KV heads (6+3 uneven split); tp=4: 4 heads / 2 KV heads (each KV
  head replicated on two ranks);
  multi-head families (GPT-2 and the older layouts): tp=2: 9 heads (5+4); tp=4: 6 heads (2+2+1+1);
  Falcon and StarCoder 1 multi-query: one KV head, replicated on every rank.
Vocab 101 and intermediate size 98 do not divide by 2 or 4 (vocab padding, uneven MLP and expert splits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from torch import nn

from tp_plugin.sharding import unshard_tensor

COMMON = dict(vocab_size=101, hidden_size=72, intermediate_size=98, num_hidden_layers=2, max_position_embeddings=64,
              attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HEADS = {2: dict(num_attention_heads=9, num_key_value_heads=3, head_dim=8),
         4: dict(num_attention_heads=4, num_key_value_heads=2, head_dim=18)}
MHA = {2: 9, 4: 6}  # multi-head attention: 9 heads -> 5+4 at tp=2; 6 heads -> 2+2+1+1 at tp=4

# The families of the parity suite (test_parity: every loss, head and gradient), and the further families
# with hand-written policies (test_architectures: one forward and backward each, all in one set of ranks).
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"]
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "gemma2", "gemma3_text", "phi", "phi3", "gptj", "gpt_neox",
            "falcon", "falcon_gqa", "opt", "bloom", "starcoder2", "olmo2", "cohere", "granite", "bert", "roberta",
            "gpt_bigcode", "gpt_bigcode_mha"]
ENCODERS = ("bert", "roberta")  # built with a sequence-classification head (3 labels)


def build(arch: str, tp: int, *, head: str | None = None, tied: bool = True, seed: int = 0,
          layers: int = 2) -> nn.Module:
    """A seeded tiny model of `arch` whose head counts exercise the split rules at `tp`.

    `head` is "causal_lm" or "seq_cls" (default: seq_cls for the encoders, causal_lm otherwise); `tied` and
    `layers` are honoured for the parity families (ARCHS) only, the others are built as their config defaults.
    """
    torch.manual_seed(seed)
    head = head or ("seq_cls" if arch in ENCODERS else "causal_lm")
    if arch in FAMILIES:
        if not tied or layers != 2:
            raise ValueError(f"build({arch!r}): tied/layers are only set for {ARCHS}")
        config = _family_config(arch, tp)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=101, n_embd=72, n_head=MHA[tp], n_layer=layers,
                                         n_positions=64,
                                         n_inner=98, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    else:
        extra = {"attention_bias": True} if arch == "qwen2" else {}
        config = transformers.AutoConfig.for_model(arch, **{**COMMON, "num_hidden_layers": layers}, **HEADS[tp],
                                                   tie_word_embeddings=tied, **extra)
    config.num_labels = 3
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "seq_cls": transformers.AutoModelForSequenceClassification}[head]
    model = auto.from_config(config, attn_implementation="eager")
    _perturb(model)
    return model


NO_DROPOUT = dict(attention_dropout=0.0, hidden_dropout=0.0)


def _gqa(model_type: str, tp: int, **extra):
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **HEADS[tp], **extra})


def _family_config(arch: str, tp: int):
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


def _perturb(model: nn.Module) -> None:
    """Random norms and biases: HF initialises them to 1 / 0, which would hide a mis-sliced bias or norm."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)


def batch(seed: int = 1, batch_size: int = 2, seq: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 101, (batch_size, seq), generator=gen)


def full_grad(model: nn.Module, name: str, param: torch.Tensor, group) -> torch.Tensor:
    """The full gradient of a (possibly sharded) parameter, gathered from every rank of the TP group."""
    spec = getattr(param, "tp_shard", None)
    if spec is None:
        return param.grad
    grads, specs = [None] * dist.get_world_size(group), [None] * dist.get_world_size(group)
    dist.all_gather_object(grads, param.grad, group=group)
    dist.all_gather_object(specs, spec, group=group)
    return unshard_tensor(grads, specs)


def full_param(param: torch.Tensor, group) -> torch.Tensor:
    spec = getattr(param, "tp_shard", None)
    if spec is None:
        return param.detach()
    shards, specs = [None] * dist.get_world_size(group), [None] * dist.get_world_size(group)
    dist.all_gather_object(shards, param.detach(), group=group)
    dist.all_gather_object(specs, spec, group=group)
    return unshard_tensor(shards, specs)


def max_errors(split: nn.Module, ref: nn.Module, group) -> dict[str, float]:
    """Max abs difference of every parameter's gradient, split (gathered) vs. unsplit, keyed by name."""
    ref_params = dict(ref.named_parameters())
    errors = {}
    for name, param in split.named_parameters():
        grad = full_grad(split, name, param, group)
        errors[name] = (grad - ref_params[name].grad).abs().max().item()
    missing = set(ref_params) - {n for n, _ in split.named_parameters()}
    assert not missing, f"parameters lost by the split: {missing}"
    return errors
