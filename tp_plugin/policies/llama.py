"""Llama-style decoders: separate q/k/v/o projections and a gated MLP (Llama, Mistral, Qwen2/3, Gemma 1-3,
Granite, StarCoder2, OLMo2, Cohere)."""

from dataclasses import replace

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from ..sharding import TPSplitError
from ..styles import ShardedNorm

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

# Gemma2 / Gemma3 (text): Llama's layout (+ softcapping, sliding windows: per-head, unaffected by the split);
# Gemma3's q/k norms act per head like Qwen3's. Granite: Llama plus scalar multipliers.
GEMMA3 = replace(QWEN3, name="gemma3_text")
for model_type in ("gemma2", "granite", "helium"):
    register_policy(model_type, LLAMA)
register_policy("gemma3_text", GEMMA3)

# StarCoder2: Llama attention, a plain (non-gated) c_fc -> c_proj MLP.
STARCODER2 = Policy(
    name="starcoder2",
    layers={**{k: v for k, v in LLAMA.layers.items() if ".mlp." not in k},
            "layers.*.mlp.c_fc": Colwise(), "layers.*.mlp.c_proj": Rowwise()},
    attention=LLAMA.attention, regions=LLAMA.regions)
register_policy("starcoder2", STARCODER2)

# OLMo2: q_norm / k_norm are RMSNorms over the *full* q and k widths (all heads), so each rank computes the
# mean of squares of its heads and one all-reduce gives the global statistic (ShardedNorm).
OLMO2 = Policy(
    name="olmo2",
    layers={**LLAMA.layers, "layers.*.self_attn.q_norm": ShardedNorm("q"), "layers.*.self_attn.k_norm": ShardedNorm("kv")},
    attention=LLAMA.attention, regions=LLAMA.regions)
register_policy("olmo2", OLMO2)


def cohere(model) -> Policy:
    """Cohere: Llama's projections in a parallel block (one LayerNorm feeds attention and MLP; each region
    all-reduces its own input gradient, so the block still costs 2 all-reduces each way)."""
    if getattr(model.config, "use_qk_norm", False):
        raise TPSplitError("cohere with use_qk_norm=True: its q/k LayerNorm weights are [heads, head_dim] and would "
                           "need splitting by heads, which this policy does not do; register a policy that does, "
                           "or use tp_plugin.parallelize(model, policy=...)")
    return replace(LLAMA, name="cohere")


register_policy("cohere", cohere)
