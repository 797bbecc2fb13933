"""GPT-J, CodeGen, GPT-NeoX and Falcon: one LayerNorm output feeds attention and MLP side by side (GPT-NeoX with
`use_parallel_residual`). Each of the two is a region that all-reduces its own input gradient, so a block
still costs 2 all-reduces forward (out-projection, MLP down-projection) and 2 backward."""

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from ..sharding import ShardSpec, TPSplitError
from ..styles import ColumnStyle, GroupedQKV, HeadColwise, HeadRowwise, RowStyle
from ..styles.base import dims, linear_entry

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



def _codegen_blocks(path: str, width: int, parts: int, heads: int, tp: int, mp_num: int = 4):
    """CodeGen's layout: `width` = mp_num blocks, each `parts` pieces (q | v | k, or one for the heads' output)
    for heads/mp_num heads. Rank r keeps the r-th tp-th of every piece: whole heads, and the model's forward,
    which reshapes by its hard-coded mp_num = 4, sees this rank's heads as 4 blocks again."""
    if heads % (mp_num * tp):
        raise TPSplitError(f"{path}: CodeGen lays its {heads} heads out in {mp_num} blocks; at tp={tp} each rank "
                           f"needs whole heads in every block ({heads} % {mp_num * tp} != 0)")
    piece = width // (mp_num * parts)
    share = piece // tp
    return [ShardSpec(0, width, tuple((start + r * share, start + (r + 1) * share)
                                      for start in range(0, width, piece))) for r in range(tp)]


class _CodeGenQKV(ColumnStyle):
    def __repr__(self) -> str:
        return "CodeGenQKV()"

    def plan_entry(self, path, module, tp, attn):
        specs = _codegen_blocks(path, dims(module)[0], 3, attn.num_heads, tp)
        return linear_entry(path, module, self, specs)


class _CodeGenOut(RowStyle):
    def __repr__(self) -> str:
        return "CodeGenOut()"

    def plan_entry(self, path, module, tp, attn):
        specs = [ShardSpec(1, s.full_size, s.ranges) for s in _codegen_blocks(path, dims(module)[1], 1,
                                                                                attn.num_heads, tp)]
        return linear_entry(path, module, self, specs)


def codegen(model, tp_size: int) -> Policy:
    """GPT-J's block with CodeGen's qkv_proj ([4 blocks of q | v | k]); when the heads do not split into whole
    heads per block on every rank, the attention is kept whole (replicated) and only the MLP is split."""
    mlp = {"h.*.mlp.fc_in": Colwise(), "h.*.mlp.fc_out": Rowwise()}
    if model.config.n_head % (4 * tp_size):
        return Policy(name=f"codegen (attention kept whole: {model.config.n_head} heads in 4 blocks do not split "
                           f"over {tp_size} ranks)", layers=mlp, regions=("h.*.mlp",),
                      replicate=("h.*.attn.qkv_proj", "h.*.attn.out_proj"))
    return Policy(name="codegen", layers={"h.*.attn.qkv_proj": _CodeGenQKV(), "h.*.attn.out_proj": _CodeGenOut(),
                                          **mlp},
                  attention=GPTJ.attention, regions=GPTJ.regions)


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
register_policy("codegen", codegen)
register_policy("gpt_neox", GPT_NEOX)
register_policy("falcon", falcon)
