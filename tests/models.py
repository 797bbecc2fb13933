"""Tiny random models for parity tests (no hub downloads), and helpers to compare split vs. unsplit."""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from torch import nn

from tp_plugin.sharding import unshard_tensor

# Head counts chosen to exercise the rules: 9 heads / 3 KV heads gives an uneven 6+3 split at tp=2;
# 4 heads / 2 KV heads at tp=4 replicates each KV head on two ranks; vocab 101 and intermediate 98 do not
# divide by 2 or 4 (vocab padding, uneven MLP split).
COMMON = dict(vocab_size=101, hidden_size=72, intermediate_size=98, num_hidden_layers=2, max_position_embeddings=64,
              attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HEADS = {2: dict(num_attention_heads=9, num_key_value_heads=3, head_dim=8),
         4: dict(num_attention_heads=4, num_key_value_heads=2, head_dim=18)}
GPT2_HEADS = {2: 9, 4: 6}  # multi-head attention: 9 heads -> 5+4 at tp=2; 6 heads -> 2+2+1+1 at tp=4

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"]


def build(arch: str, tp: int, *, head: str = "causal_lm", tied: bool = True, seed: int = 0,
          layers: int = 2) -> nn.Module:
    """A seeded tiny model of `arch` whose head counts exercise the split rules at `tp`."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=101, n_embd=72, n_head=GPT2_HEADS[tp], n_layer=layers,
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
