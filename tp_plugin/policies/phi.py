"""Phi (parallel attention + MLP block, `dense` out-projection) and Phi-3 (fused `qkv_proj`, `gate_up_proj`)."""

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from ..styles import HeadAttrs

PHI = Policy(
    name="phi",
    layers={
        "layers.*.self_attn.q_proj": Colwise("q"),
        "layers.*.self_attn.k_proj": Colwise("kv"),
        "layers.*.self_attn.v_proj": Colwise("kv"),
        "layers.*.self_attn.dense": Rowwise("q"),
        "layers.*.mlp.fc1": Colwise(),
        "layers.*.mlp.fc2": Rowwise(),
    },
    attention=AttentionSpec("layers.*.self_attn"),
    regions=("layers.*.self_attn", "layers.*.mlp"),
    # optional per-head LayerNorms on q and k (qk_layernorm=True): replicated, gradients summed over TP
    partial_grad=("layers.*.self_attn.q_layernorm", "layers.*.self_attn.k_layernorm"),
)

PHI3 = Policy(
    name="phi3",
    layers={
        "layers.*.self_attn.qkv_proj": Colwise("q", "kv", "kv"),  # [q | k | v]: each rank its q, its k, its v
        "layers.*.self_attn.o_proj": Rowwise("q"),
        "layers.*.self_attn": HeadAttrs(),  # its forward slices qkv by `config.num_attention_heads * head_dim`
        "layers.*.mlp.gate_up_proj": Colwise("", ""),  # [gate | up], chunked in two by the MLP
        "layers.*.mlp.down_proj": Rowwise(),
    },
    attention=AttentionSpec("layers.*.self_attn"),
    regions=("layers.*.self_attn", "layers.*.mlp"),
)

register_policy("phi", PHI)
register_policy("phi3", PHI3)
