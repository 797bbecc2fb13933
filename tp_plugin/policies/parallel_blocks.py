"""GPT-J, GPT-NeoX and Falcon: one LayerNorm output feeds attention and MLP side by side (GPT-NeoX with
`use_parallel_residual`). Each of the two is a region that all-reduces its own input gradient, so a block
still costs 2 all-reduces forward (out-projection, MLP down-projection) and 2 backward."""

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from ..styles import GroupedQKV, HeadColwise, HeadRowwise

GPTJ = Policy(
    name="gptj",
    layers={
        "h.*.attn.q_proj": Colwise("q"),
        "h.*.attn.k_proj": Colwise("q"),  # multi-head attention: as many KV heads as query heads
        "h.*.attn.v_proj": Colwise("q"),
        "h.*.attn.out_proj": Rowwise("q"),
        "h.*.mlp.fc_in": Colwise(),
        "h.*.mlp.fc_out": Rowwise(),
    },
    # `embed_dim` is only read to build the layers; the heads are passed explicitly to the reshapes
    attention=AttentionSpec("h.*.attn", num_heads="n_head", num_kv_heads=None, head_dim=None),
    regions=("h.*.attn", "h.*.mlp"),
)

# GPT-NeoX packs q, k, v per head: [h0: q k v | h1: q k v | ...], so a rank's heads are one contiguous block.
GPT_NEOX = Policy(
    name="gpt_neox",
    layers={
        "layers.*.attention.query_key_value": HeadColwise("q"),
        "layers.*.attention.dense": HeadRowwise(),
        "layers.*.mlp.dense_h_to_4h": Colwise(),
        "layers.*.mlp.dense_4h_to_h": Rowwise(),
    },
    attention=AttentionSpec("layers.*.attention", num_kv_heads=None, head_dim=None),
    regions=("layers.*.attention", "layers.*.mlp"),
)


def falcon(model) -> Policy:
    """Falcon's fused query_key_value has three layouts, picked by the config:
    new_decoder_architecture: per KV group [q_0..q_g, k, v] (GroupedQKV, KV count `num_kv_heads`);
    multi_query: [all q | k | v] with one KV head, replicated on every rank; else per head [q k v] (MHA)."""
    config = model.config
    if config.new_decoder_architecture:
        qkv, kv = GroupedQKV(), "num_kv_heads"
    elif config.multi_query:
        qkv, kv = Colwise("q", "kv", "kv"), 1  # one KV head, replicated on every rank
    else:
        qkv, kv = GroupedQKV(), None  # MHA per-head interleaved = grouped with one query head per group
    if config.alibi:
        from ..sharding import TPSplitError

        raise TPSplitError("falcon with alibi=True is not supported by the falcon policy (its ALiBi bias is "
                           "built for all heads inside the attention); register a policy for it")
    return Policy(
        name="falcon",
        layers={
            "h.*.self_attention.query_key_value": qkv,
            "h.*.self_attention.dense": Rowwise("q"),
            "h.*.mlp.dense_h_to_4h": Colwise(),
            "h.*.mlp.dense_4h_to_h": Rowwise(),
        },
        attention=AttentionSpec("h.*.self_attention", num_kv_heads=kv, head_dim=None),
        regions=("h.*.self_attention", "h.*.mlp"),
    )


register_policy("gptj", GPTJ)
register_policy("gpt_neox", GPT_NEOX)
register_policy("falcon", falcon)
