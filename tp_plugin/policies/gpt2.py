"""GPT-2: fused, transposed `Conv1D` projections (`c_attn` holds q|k|v as `[in, 3 * hidden]`)."""

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy

GPT2 = Policy(
    name="gpt2",
    layers={
        "h.*.attn.c_attn": Colwise("q", "kv", "kv"),  # split per part: each rank gets its q, its k, its v
        "h.*.attn.c_proj": Rowwise("q"),
        "h.*.mlp.c_fc": Colwise(),
        "h.*.mlp.c_proj": Rowwise(),
    },
    # multi-head attention: KV heads = heads; `split_size` is the width `c_attn`'s output is split by
    attention=AttentionSpec("h.*.attn", num_heads="n_head", num_kv_heads=None, head_dim=None,
                            local_dims=("split_size",)),
    regions=("h.*.attn", "h.*.mlp"),
)

register_policy("gpt2", GPT2)


def gpt_bigcode(model) -> Policy:
    """GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's block with nn.Linear projections. Multi-query attention
    (the usual config): `c_attn` is [all q | k | v] with one KV head, which every rank keeps whole (its gradient
    is summed over the ranks, like Falcon's multi-query head); `embed_dim` is the width the forward splits the q
    part by. Multi-head: `c_attn` packs q, k, v per head ([h0: q k v | h1: ...], as GPT-NeoX)."""
    from ..styles import HeadColwise, HeadRowwise

    multi_query = model.config.multi_query
    qkv, out = (Colwise("q", "kv", "kv"), Rowwise("q")) if multi_query else (HeadColwise("q"), HeadRowwise())
    return Policy(
        name="gpt_bigcode",
        layers={"h.*.attn.c_attn": qkv, "h.*.attn.c_proj": out, "h.*.mlp.c_fc": Colwise(), "h.*.mlp.c_proj": Rowwise()},
        attention=AttentionSpec("h.*.attn", num_heads="n_head", num_kv_heads=1 if multi_query else None,
                                head_dim=None, local_dims=("embed_dim", "split_size")),
        regions=("h.*.attn", "h.*.mlp"),
    )


register_policy("gpt_bigcode", gpt_bigcode)
