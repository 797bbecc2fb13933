"""Styles beyond plain Colwise/Rowwise, for the layouts the model zoo uses. Each resolves itself
(`plan_entry`, pure, run on every rank before any collective) and, when it is not a plain linear, builds its
own layer (`build`).

    HeadColwise("q")   q/k/v-like projection split on head boundaries whatever the per-head width
                       (MLA's q_b_proj / kv_b_proj, [heads, 3, head_dim] packed qkv as in GPT-NeoX)
    HeadRowwise()      the matching out-projection (its input is this rank's heads, any per-head width)
    GroupedQKV()       fused qkv packed per KV group, [kv, q_per_group + 2, head_dim] (Falcon's new
                       architecture); with kv = heads it is the per-head interleaved q|k|v of GPT-NeoX / BLOOM
    Experts()          fused 3-D MoE experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]): every expert's
                       MLP is split along I like a dense MLP, so all experts live on every rank (no expert
                       routing or load imbalance between ranks); the router stays replicated
    ShardedNorm()      RMSNorm over the full q (or k) width of sharded heads (OLMo2): the sum of squares is
                       all-reduced, each rank keeps its slice of the weight
    AlibiHeads()       BLOOM / MPT-style ALiBi bias built for all heads: each rank keeps its heads' slopes
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .comm import all_reduce_both_ways, copy_to_tp, reduce_from_tp, sum_grad_over_sharers
from .layers import _shard_param
from .plan import PlanEntry
from .sharding import ShardSpec, TPSplitError, even_ranges


def _linear_entry(path: str, module: nn.Module, style, specs: list[ShardSpec], *, colwise: bool, shared=False):
    transposed = isinstance(module, Conv1D)
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TPSplitError(f"{path}: expected nn.Linear or Conv1D for {style!r}, found {type(module).__name__}")
    full = {"weight": tuple(module.weight.shape)}
    per_rank = [{"weight": s} for s in specs]
    if module.bias is not None:
        full["bias"] = tuple(module.bias.shape)
        for rank, spec in enumerate(specs):
            per_rank[rank]["bias"] = ShardSpec(0, spec.full_size, spec.ranges) if colwise else None
    return PlanEntry(path, repr(style), full, per_rank, transposed=transposed, shared_rows=shared)


def _dims(module: nn.Module) -> tuple[int, int, int, int]:
    """(out_features, in_features, out_dim, in_dim) of a Linear or a transposed GPT-2 Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0], 1, 0
    return module.weight.shape[0], module.weight.shape[1], 0, 1


def _need_heads(path, style, attn):
    if attn is None:
        raise TPSplitError(f"{path}: style {style!r} splits by heads but the policy declares no attention")


def _per_head(path: str, size: int, heads: int) -> int:
    if size % heads:
        raise TPSplitError(f"{path}: {size} features are not a multiple of {heads} heads; the policy does not fit")
    return size // heads


class HeadColwise:
    """Column-parallel on head boundaries: `kind` "q" (query heads) or "kv" (KV heads), width = out / heads."""

    def __init__(self, kind: str = "q"):
        if kind not in ("q", "kv"):
            raise ValueError(f"HeadColwise kind must be 'q' or 'kv' (got {kind!r})")
        self.kind = kind

    def __repr__(self) -> str:
        return f"Colwise(heads={self.kind!r})"

    def plan_entry(self, path, module, tp, attn):
        _need_heads(path, self, attn)
        out, _, out_dim, _ = _dims(module)
        heads = attn.num_heads if self.kind == "q" else attn.num_kv_heads
        width = _per_head(path, out, heads)
        ranges = [h.q_heads if self.kind == "q" else h.kv_heads for h in attn.heads]
        specs = [ShardSpec(out_dim, out, ((a * width, b * width),)) for a, b in ranges]
        shared = self.kind == "kv" and any(h.kv_shared for h in attn.heads)
        return _linear_entry(path, module, self, specs, colwise=True, shared=shared)


class HeadRowwise:
    """Row-parallel over this rank's query heads' outputs, width = in / heads."""

    def __repr__(self) -> str:
        return "Rowwise(heads='q')"

    def plan_entry(self, path, module, tp, attn):
        _need_heads(path, self, attn)
        _, inp, _, in_dim = _dims(module)
        width = _per_head(path, inp, attn.num_heads)
        specs = [ShardSpec(in_dim, inp, ((h.q_heads[0] * width, h.q_heads[1] * width),)) for h in attn.heads]
        return _linear_entry(path, module, self, specs, colwise=False)


class GroupedQKV:
    """Fused qkv packed per KV group: [kv, q_per_group + 2, head_dim] rows. Each rank keeps its groups; when
    KV heads are replicated (tp > kv) it keeps its query heads of the group plus the group's k and v."""

    def __repr__(self) -> str:
        return "Colwise(grouped_qkv)"

    def plan_entry(self, path, module, tp, attn):
        _need_heads(path, self, attn)
        out, _, out_dim, _ = _dims(module)
        group = attn.num_heads // attn.num_kv_heads
        hd = _per_head(path, out, attn.num_kv_heads * (group + 2))
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
        return _linear_entry(path, module, self, specs, colwise=True, shared=shared)


class Experts:
    """Fused 3-D MoE experts split along the intermediate dim I (see the module docstring).

    Forward: the partial outputs of every rank are all-reduced once (like a row-parallel down_proj).
    Backward: the gradients of the experts' inputs (hidden states and routing weights) are all-reduced once
    each, so the replicated router gets full, identical gradients on every rank.
    """

    def __repr__(self) -> str:
        return "Experts(split I)"

    def plan_entry(self, path, module, tp, attn):
        if getattr(module, "has_bias", False) or getattr(module, "down_proj_bias", None) is not None:
            raise TPSplitError(f"{path}: MoE experts with biases ({type(module).__name__}) are not supported: the "
                               f"down_proj bias would be added once per rank. Register a policy that keeps "
                               f"{path} replicated (Policy(replicate=...)).")
        down = getattr(module, "down_proj", None)
        up_name = "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else "up_proj"
        up = getattr(module, up_name, None)
        if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor) or down.dim() != 3:
            raise TPSplitError(f"{path}: Experts() expects 3-D `gate_up_proj`/`up_proj` and `down_proj` parameters "
                               f"on {type(module).__name__}")
        transposed = bool(getattr(module, "is_transposed", False))
        up_dim, down_dim = (2, 1) if transposed else (1, 2)
        inter = down.shape[down_dim]
        gated = up_name == "gate_up_proj"
        if up.shape[up_dim] != (2 if gated else 1) * inter:
            raise TPSplitError(f"{path}: {up_name} {tuple(up.shape)} does not match down_proj {tuple(down.shape)}")
        concatenated = getattr(module, "is_concatenated", True)
        per_rank = []
        # split in units of 4 rows when I allows it: every shard keeps 16-byte aligned strides (grouped_mm)
        unit = 4 if inter % 4 == 0 and inter // 4 >= tp else 1
        for a, b in even_ranges(inter // unit, tp, what=f"{path} (intermediate size {inter})"):
            a, b = a * unit, b * unit
            if not gated:
                up_ranges = ((a, b),)
            elif concatenated:  # [gate; up]: this rank's rows of each part
                up_ranges = ((a, b), (inter + a, inter + b))
            else:  # interleaved [g0, u0, g1, u1, ...]
                up_ranges = ((2 * a, 2 * b),)
            per_rank.append({up_name: ShardSpec(up_dim, up.shape[up_dim], up_ranges),
                             "down_proj": ShardSpec(down_dim, inter, ((a, b),))})
        full = {up_name: tuple(up.shape), "down_proj": tuple(down.shape)}
        return PlanEntry(path, repr(self), full, per_rank, custom=self)

    def build(self, entry, module, rank, group):
        for name, spec in entry.specs[rank].items():
            setattr(module, name, _shard_param(getattr(module, name), spec))
        local = entry.specs[rank]["down_proj"].local_size
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, local)
        config = getattr(module, "config", None)
        if config is not None and (local * module.down_proj.element_size()) % 16:
            # torch's grouped_mm needs 16-byte aligned strides; an uneven split (e.g. I=50 -> 25) is not, so
            # this module alone runs the eager per-expert loop (same math) on its own copy of the config
            config = copy.copy(config)
            config._experts_implementation = "eager"
            module.config = config
        module.register_forward_pre_hook(_experts_inputs(group), with_kwargs=True)
        module.register_forward_hook(lambda mod, args, out: reduce_from_tp(out, group))
        return module


def _experts_inputs(group):
    def hook(module, args, kwargs):
        args = list(args)
        for i, name in ((0, "hidden_states"), (2, "top_k_weights")):
            if i < len(args) and torch.is_tensor(args[i]) and args[i].is_floating_point():
                args[i] = copy_to_tp(args[i], group)
            elif torch.is_tensor(kwargs.get(name)):
                kwargs[name] = copy_to_tp(kwargs[name], group)
        return tuple(args), kwargs
    return hook


class _ShardedRMSNorm(nn.Module):
    """RMSNorm whose normalised dim is split over the TP group: the sum of squares is all-reduced.

    With replicated KV heads (a k norm at tp > kv) every KV head sits on `replicas` ranks: the all-reduced
    sum counts it that many times, so it is divided by `replicas`, and the weight's gradient is summed over
    the ranks that hold the same rows (as for the replicated k projection itself)."""

    def __init__(self, norm: nn.Module, spec: ShardSpec, group, eps: float, replicas: int):
        super().__init__()
        self.group, self.spec, self.eps, self.replicas = group, spec, eps, replicas
        self.weight = _shard_param(norm.weight, spec, replicas=replicas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        sq = all_reduce_both_ways(x.pow(2).sum(-1, keepdim=True), self.group) / self.replicas
        x = x * torch.rsqrt(sq / self.spec.full_size + self.eps)
        weight = self.weight
        if self.replicas > 1:
            weight = sum_grad_over_sharers(weight, self.group, self.spec.ranges, self.spec.full_size)
        return weight * x.to(dtype)


class ShardedNorm:
    """An RMSNorm applied to the full q (kind "q") or k ("kv") projection of sharded heads (OLMo2)."""

    def __init__(self, kind: str = "q"):
        self.kind = kind

    def __repr__(self) -> str:
        return f"ShardedRMSNorm(heads={self.kind!r})"

    def plan_entry(self, path, module, tp, attn):
        _need_heads(path, self, attn)
        width = module.weight.shape[0]
        heads = attn.num_heads if self.kind == "q" else attn.num_kv_heads
        per = _per_head(path, width, heads)
        ranges = [h.q_heads if self.kind == "q" else h.kv_heads for h in attn.heads]
        specs = [{"weight": ShardSpec(0, width, ((a * per, b * per),))} for a, b in ranges]
        replicas = ranges.count(ranges[0]) if self.kind == "kv" else 1  # tp // kv when KV heads are replicated
        return PlanEntry(path, repr(self), {"weight": (width,)}, specs, shared_rows=replicas > 1,
                         custom=_NormBuilder(replicas))


class _NormBuilder:
    def __init__(self, replicas: int):
        self.replicas = replicas

    def build(self, entry, module, rank, group):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return _ShardedRMSNorm(module, entry.specs[rank]["weight"], group, eps, self.replicas)


class AlibiHeads:
    """On an attention module that receives `alibi` for all heads ([batch * heads, 1, kv]), keep this rank's."""

    def __repr__(self) -> str:
        return "AlibiHeads()"

    def plan_entry(self, path, module, tp, attn):
        _need_heads(path, self, attn)
        return PlanEntry(path, repr(self), {}, [{} for _ in range(tp)], custom=_AlibiSlice(attn))


class _AlibiSlice:
    def __init__(self, attn):
        self.heads, self.num_heads = [h.q_heads for h in attn.heads], attn.num_heads

    def build(self, entry, module, rank, group):
        a, b = self.heads[rank]
        num_heads = self.num_heads

        def hook(mod, args, kwargs):
            alibi = kwargs.get("alibi")
            if alibi is None:
                return args, kwargs
            full = alibi.reshape(-1, num_heads, *alibi.shape[1:])  # [batch, heads, 1, kv]
            kwargs["alibi"] = full[:, a:b].reshape(-1, *alibi.shape[1:])
            return args, kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


HEAD_CONFIG_ATTRS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_CONFIG_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")


class HeadAttrs:
    """Patch the head-count and heads-width attributes of every module under a split attention module
    (names vary: num_heads, n_head, num_attention_heads, all_head_size, embed_dim, ...), and of a private
    copy of the config when the module reads head counts from `self.config`."""

    COUNT = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads", "n_local_heads",
             "attention_heads", "num_q_heads", "heads")
    KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_local_kv_heads", "kv_heads", "num_heads_kv",
          "n_head_kv", "num_kv")
    WIDTH = ("all_head_size", "embed_dim", "hidden_size", "inner_dim", "split_size", "attention_hidden_size",
             "hidden_size_per_attention_head_x_heads", "inner_size", "projection_size", "attn_dim", "d_model")

    def __repr__(self) -> str:
        return "HeadAttrs()"

    def plan_entry(self, path, module, tp, attn):
        return PlanEntry(path, repr(self), {}, [{} for _ in range(tp)], custom=_PatchHeads(attn))


class _PatchHeads:
    def __init__(self, attn):
        self.attn = attn

    def build(self, entry, module, rank, group):
        a, shard = self.attn, self.attn.heads[rank]
        width = a.num_heads * a.head_dim
        for sub in module.modules():
            config = getattr(sub, "config", None)
            if config is not None and hasattr(config, "to_dict"):  # forward reads head counts off the config
                sub.config = config = copy.copy(config)  # (Phi-3's `config.num_attention_heads * head_dim`)
                for name in HEAD_CONFIG_ATTRS:
                    if getattr(config, name, None) == a.num_heads:
                        setattr(config, name, shard.num_q)
                for name in KV_CONFIG_ATTRS:
                    if getattr(config, name, None) == a.num_kv_heads:
                        setattr(config, name, shard.num_kv)
            for name, value in list(vars(sub).items()):
                if not isinstance(value, int) or isinstance(value, bool):
                    continue
                if name in HeadAttrs.COUNT and value == a.num_heads:
                    setattr(sub, name, shard.num_q)
                elif name in HeadAttrs.KV and value == a.num_kv_heads:
                    setattr(sub, name, shard.num_kv)
                elif name == "num_key_value_groups" and value == a.num_heads // a.num_kv_heads:
                    setattr(sub, name, shard.num_q // shard.num_kv)
                elif name in HeadAttrs.WIDTH and value == width:
                    setattr(sub, name, shard.num_q * a.head_dim)
        return module
