"""OPT (q/k/v/out_proj, fc1/fc2 MLP), BLOOM (per-head packed query_key_value, ALiBi positions) and MPT
([q | k | v] Wqkv, ALiBi positions passed to every attention as `position_bias`)."""

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from ..styles import AlibiHeads, HeadColwise, HeadRowwise

OPT = Policy(
    name="opt",
    layers={
        "decoder.layers.*.self_attn.q_proj": Colwise("q"),
        "decoder.layers.*.self_attn.k_proj": Colwise("q"),  # multi-head attention
        "decoder.layers.*.self_attn.v_proj": Colwise("q"),
        "decoder.layers.*.self_attn.out_proj": Rowwise("q"),
        "decoder.layers.*.fc1": Colwise(),
        "decoder.layers.*.fc2": Rowwise(),
    },
    attention=AttentionSpec("decoder.layers.*.self_attn", num_kv_heads=None, head_dim=None,
                            local_dims=("embed_dim",)),
    regions=("decoder.layers.*.self_attn",),  # fc1 reads the block's normed input directly: no MLP module
    replicate=("decoder.project_in", "decoder.project_out"),  # word_embed_proj_dim <-> hidden (OPT-350m)
)

BLOOM = Policy(
    name="bloom",
    layers={
        "h.*.self_attention.query_key_value": HeadColwise("q"),  # [h0: q k v | h1: q k v | ...]
        "h.*.self_attention.dense": HeadRowwise(),
        "h.*.self_attention": AlibiHeads(),  # each rank keeps the ALiBi slopes of its own heads
        "h.*.mlp.dense_h_to_4h": Colwise(),
        "h.*.mlp.dense_4h_to_h": Rowwise(),
    },
    attention=AttentionSpec("h.*.self_attention", num_heads="n_head", num_kv_heads=None, head_dim=None),
    regions=("h.*.self_attention", "h.*.mlp"),
)

MPT = Policy(
    name="mpt",
    layers={
        "blocks.*.attn.Wqkv": Colwise("q", "q", "q"),  # multi-head: [q | k | v], each on head boundaries
        "blocks.*.attn.out_proj": Rowwise("q"),
        "blocks.*.attn": AlibiHeads("position_bias"),
        "blocks.*.ffn.up_proj": Colwise(),
        "blocks.*.ffn.down_proj": Rowwise(),
    },
    attention=AttentionSpec("blocks.*.attn", num_heads="n_heads", num_kv_heads=None, head_dim=None),
    regions=("blocks.*.attn", "blocks.*.ffn"),
)

register_policy("opt", OPT)
register_policy("bloom", BLOOM)
register_policy("mpt", MPT)
