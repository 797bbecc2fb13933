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
