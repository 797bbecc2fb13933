"""Model shapes the benchmarks build (random weights from a `LlamaConfig`, never a hub download)."""

from __future__ import annotations

import transformers

# SmolLM2-135M: 9 heads / 3 KV heads, so tp=2 needs an uneven split on KV-group boundaries (6+3 heads).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
# The same parameter count and FLOPs with head counts that divide by 2 (12 x 48 = 9 x 64 = 576), so that
# transformers' own TP, which needs dividing heads, has a shape to be compared on.
SMOLLM2_135M_H12 = {**SMOLLM2_135M, "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 48}
# A ~0.5B Llama-shaped model (0.48B parameters at 26 layers; untied embeddings, 16 heads / 8 KV heads).
LLAMA_05B = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=26,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
                 rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096)
# The same with multi-head attention (16 KV heads: a GQA ratio of 1).
LLAMA_05B_MHA = {**LLAMA_05B, "num_key_value_heads": 16}
# Qwen2.5-0.5B's shape (as a Llama: no q/k/v bias): a 152k vocabulary, tied, 14 heads / 2 KV heads, hidden 896.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)
# Llama-3.2-1B's shape: hidden 2048, 32 heads / 8 KV heads (GQA 4), a 128k vocabulary, tied.
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                 rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
# A Llama-3 vocabulary (128256, untied) on a small body (hidden 512, 8 heads / 4 KV heads): the head and the loss
# dominate the step, as they do in a long-sequence step of a real Llama 3.
LLAMA3_VOCAB_H512 = dict(vocab_size=128256, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
# Tiny: for --quick and the smoke test (9/3 heads keeps the uneven split in the code path).
TOY = dict(vocab_size=1000, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
           num_key_value_heads=3, head_dim=8, tie_word_embeddings=True, max_position_embeddings=256)
TOY_H4 = {**TOY, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 18}

SHAPES = {"smollm2-135m": SMOLLM2_135M, "smollm2-135m-h12": SMOLLM2_135M_H12, "llama-0.5b": LLAMA_05B,
          "llama-0.5b-mha": LLAMA_05B_MHA, "qwen2.5-0.5b": QWEN25_05B, "llama3.2-1b": LLAMA32_1B,
          "llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "llama3-vocab-h512": LLAMA3_VOCAB_H512, "toy": TOY,
          "toy-h4": TOY_H4}


def config(shape: str, layers: int | None = None) -> transformers.LlamaConfig:
    """The `LlamaConfig` of a named shape, optionally with fewer layers (said in every result row)."""
    kwargs = dict(SHAPES[shape])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    return transformers.LlamaConfig(**kwargs, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def param_count(cfg: transformers.LlamaConfig) -> int:
    """Parameters of a Llama model with this config (checked against a built model in the smoke test)."""
    h, i, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    block = h * (2 * q + 2 * kv) + 3 * h * i + 2 * h
    return v * h * (1 if cfg.tie_word_embeddings else 2) + L * block + h
