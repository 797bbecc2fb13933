"""Styles that split on head boundaries whatever the layout, and the one way head counts get patched.

    HeadColwise("q")   q/k/v-like projection split on head boundaries whatever the per-head width
                       (MLA's q_b_proj / kv_b_proj, [heads, 3, head_dim] packed qkv as in GPT-NeoX)
    HeadRowwise()      the matching out-projection (its input is this rank's heads, any per-head width)
    GroupedQKV()       fused qkv packed per KV group, [kv, q_per_group + 2, head_dim] (Falcon's new
                       architecture); with kv = heads it is the per-head interleaved q|k|v of GPT-NeoX / BLOOM
    HeadAttrs(names)   patches the head counts and widths of every module under a split attention (derived
                       policies, which do not know the attribute names), and slices its per-head `names`
    HeadParams(names)  per-head parameters held by the attention module itself (gpt-oss's attention sinks,
                       [heads]): each rank keeps its query heads' entries
"""

from __future__ import annotations

import copy

from torch import nn

from .base import AttentionPlan, ColumnStyle, PlanEntry, RowStyle, Style, dims, linear_entry, need_heads, per_head
from ..runtime.layers import _shard_param
from ..sharding import HeadShard, ShardSpec, TPSplitError

# Attribute names that hold head counts and widths, on attention modules and on configs: the one list of each.
COUNT = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads", "n_local_heads",
         "attention_heads", "num_q_heads", "heads")
KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_local_kv_heads", "kv_heads", "num_heads_kv",
      "n_head_kv", "num_kv", "multi_query_group_num")
# On a config, the attributes counting query heads and KV heads, in the order they are looked for (a derived
# policy reads the first that holds an int).
CONFIG_COUNT = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                "num_attention_heads_per_layer")
CONFIG_KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "n_head_kv")
WIDTH = ("all_head_size", "embed_dim", "hidden_size", "inner_dim", "split_size", "attention_hidden_size",
         "hidden_size_per_attention_head_x_heads", "inner_size", "projection_size", "attn_dim", "d_model")


def patch_heads(module: nn.Module, attn: AttentionPlan, shard: HeadShard, *, local_dims: tuple[str, ...] = (),
                deep: bool = False) -> None:
    """Make an untouched HF attention module reshape for this rank's heads.

    Every int attribute named like a head count (COUNT / KV) that holds the full count gets this rank's count,
    `num_key_value_groups` this rank's ratio, and each attribute in `local_dims` this rank's width. `deep`
    (derived policies, which do not know the names): the same on every submodule, widths found by name and
    value (WIDTH), and a private copy of a config the forward reads head counts from (Phi-3's
    `config.num_attention_heads * head_dim`).
    """
    width = attn.num_heads * attn.head_dim
    for sub in module.modules() if deep else [module]:
        config = getattr(sub, "config", None)
        if deep and config is not None and hasattr(config, "to_dict"):
            sub.config = config = copy.copy(config)
            for name in COUNT + KV:
                full = attn.num_heads if name in COUNT else attn.num_kv_heads
                if getattr(config, name, None) == full:
                    setattr(config, name, shard.num_q if name in COUNT else shard.num_kv)
        for name, value in list(vars(sub).items()):
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if name in COUNT and value == attn.num_heads:
                setattr(sub, name, shard.num_q)
            elif name in KV and value == attn.num_kv_heads:
                setattr(sub, name, shard.num_kv)
            elif name == "num_key_value_groups" and value == attn.num_heads // attn.num_kv_heads:
                setattr(sub, name, shard.num_q // shard.num_kv)
            elif deep and name in WIDTH and value == width:
                setattr(sub, name, shard.num_q * attn.head_dim)
    for name in local_dims:
        setattr(module, name, shard.num_q * attn.head_dim)


class HeadColwise(ColumnStyle):
    """Column-parallel on head boundaries: `kind` "q" (query heads) or "kv" (KV heads), width = out / heads."""

    def __init__(self, kind: str = "q"):
        if kind not in ("q", "kv"):
            raise ValueError(f"HeadColwise kind must be 'q' or 'kv' (got {kind!r})")
        self.kind = kind

    def __repr__(self) -> str:
        return f"HeadColwise({self.kind!r})"

    def plan_entry(self, path, module, tp, attn):
        need_heads(path, self, attn)
        out, _, out_dim, _ = dims(module)
        heads = attn.num_heads if self.kind == "q" else attn.num_kv_heads
        width = per_head(path, out, heads)
        ranges = [h.q_heads if self.kind == "q" else h.kv_heads for h in attn.heads]
        specs = [ShardSpec(out_dim, out, ((a * width, b * width),)) for a, b in ranges]
        shared = self.kind == "kv" and any(h.kv_shared for h in attn.heads)
        return linear_entry(path, module, self, specs, shared=shared)


class HeadRowwise(RowStyle):
    """Row-parallel over this rank's query heads' outputs, width = in / heads."""

    def plan_entry(self, path, module, tp, attn):
        need_heads(path, self, attn)
        _, inp, _, in_dim = dims(module)
        width = per_head(path, inp, attn.num_heads)
        specs = [ShardSpec(in_dim, inp, ((h.q_heads[0] * width, h.q_heads[1] * width),)) for h in attn.heads]
        return linear_entry(path, module, self, specs)


class GroupedQKV(ColumnStyle):
    """Fused qkv packed per KV group: [kv, q_per_group + 2, head_dim] rows. Each rank keeps its groups; when
    KV heads are replicated (tp > kv) it keeps its query heads of the group plus the group's k and v."""

    def plan_entry(self, path, module, tp, attn):
        need_heads(path, self, attn)
        out, _, out_dim, _ = dims(module)
        group = attn.num_heads // attn.num_kv_heads
        hd = per_head(path, out, attn.num_kv_heads * (group + 2))
        block = (group + 2) * hd
        specs = []
        for h in attn.heads:
            if not h.kv_shared:
                specs.append(ShardSpec(out_dim, out, ((h.kv_heads[0] * block, h.kv_heads[1] * block),)))
                continue
            kv = h.kv_heads[0]
            q0, q1 = h.q_heads[0] - kv * group, h.q_heads[1] - kv * group
            start = kv * block
            specs.append(ShardSpec(out_dim, out, ((start + q0 * hd, start + q1 * hd),
                                                  (start + group * hd, start + block))))
        shared = any(h.kv_shared for h in attn.heads)
        if shared and out_dim != 0:
            raise TPSplitError(f"{path}: replicated KV heads need an [out, in] weight")
        return linear_entry(path, module, self, specs, shared=shared)


class HeadParams(Style):
    """Parameters of the attention module itself laid out by query head along dim 0 (gpt-oss's `sinks`, one
    logit per head that joins the softmax): each rank keeps its heads' rows, sliced like the q projection."""

    def __init__(self, *names: str):
        self.names = names

    def __repr__(self) -> str:
        return f"HeadParams({', '.join(map(repr, self.names))})"

    def plan_entry(self, path, module, tp, attn):
        need_heads(path, self, attn)
        full, specs = {}, [{} for _ in range(tp)]
        for name in self.names:
            param = getattr(module, name, None)
            if param is None or param.dim() == 0:
                raise TPSplitError(f"{path}: HeadParams({name!r}) found no per-head tensor {name!r} on "
                                   f"{type(module).__name__}")
            size = param.shape[0]
            per = per_head(f"{path}.{name}", size, attn.num_heads)
            full[name] = tuple(param.shape)
            for rank, h in enumerate(attn.heads):
                specs[rank][name] = ShardSpec(0, size, ((h.q_heads[0] * per, h.q_heads[1] * per),))
        return PlanEntry(path, self, full, specs)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        for name, spec in entry.specs[rank].items():
            setattr(module, name, _shard_param(getattr(module, name), spec))
        return module


class HeadAttrs(HeadParams):
    """Patch the head counts and widths of every module under a split attention module (`patch_heads`, deep), and
    slice its own per-head parameters named in `names` (as HeadParams)."""

    def __repr__(self) -> str:
        return f"HeadAttrs({', '.join(map(repr, self.names))})"

    def plan_entry(self, path, module, tp, attn):
        entry = super().plan_entry(path, module, tp, attn)
        entry.resolved["attn"] = attn
        return entry

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        module = super().build(entry, module, rank, group)
        attn = entry.resolved["attn"]
        patch_heads(module, attn, attn.heads[rank], deep=True)
        return module
