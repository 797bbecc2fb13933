"""Llama-style decoders: separate q/k/v/o projections and a gated MLP (Llama, Mistral, Qwen2/3, Gemma)."""

from dataclasses import replace

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy

LLAMA = Policy(
    name="llama",
    layers={
        "layers.*.self_attn.q_proj": Colwise("q"),
        "layers.*.self_attn.k_proj": Colwise("kv"),
        "layers.*.self_attn.v_proj": Colwise("kv"),
        "layers.*.self_attn.o_proj": Rowwise("q"),
        "layers.*.mlp.gate_proj": Colwise(),
        "layers.*.mlp.up_proj": Colwise(),
        "layers.*.mlp.down_proj": Rowwise(),
    },
    attention=AttentionSpec("layers.*.self_attn"),
    regions=("layers.*.self_attn", "layers.*.mlp"),
)

# Qwen3's q/k RMSNorms act per head, on this rank's heads only: replicated weights with partial gradients.
QWEN3 = replace(LLAMA, name="qwen3", partial_grad=("layers.*.self_attn.q_norm", "layers.*.self_attn.k_norm"))

# Gemma's scaled embedding is carried over by VocabParallelEmbedding; Qwen2's q/k/v biases split with them.
for model_type in ("llama", "mistral", "qwen2", "gemma"):
    register_policy(model_type, LLAMA)
register_policy("qwen3", QWEN3)
