"""Mamba mixers, split without changing their numbers: Mamba-2 mixers by heads (Mamba-2, and the hybrids built on
the same mixer: Bamba, Falcon-H1, Zamba2, Nemotron-H, Granite-4 hybrids), the way Megatron-core splits Mamba;
Mamba (1) mixers by channels and Zamba's per-head mixers by heads (at the end).

A Mamba-2 mixer computes

    in_proj(x) -> [z | x | B | C | dt]      I, I, G*N, G*N, H features (I = H heads x head_dim P)
    conv1d, depthwise, over [x | B | C]     then the scan, per head (A_log, D, dt_bias), B and C per group
    gated RMSNorm(y, z)                     statistics per group of I/G features
    out_proj (I -> hidden)

Each rank keeps its heads: their z, x and dt rows of in_proj (column-parallel), their x channels of conv1d, their
A_log / D / dt_bias, their slice of the norm weight and of out_proj's input (row-parallel, one all-reduce). Groups
play the part of KV heads (`head_shards(H, G, tp)`): with G % tp == 0 each rank keeps whole groups and nothing
else is communicated. With fewer groups than ranks (G = 1 is common) every rank holding heads of a group also
holds that group's B and C rows and channels; their gradients are summed over the ranks holding them, and the
gated norm, whose group then spans ranks, all-reduces its per-group sum of squares (a [tokens, G] all-reduce each
way: beyond Megatron's minimum, which requires G % tp == 0).

The mixer is a region whose input only in_proj reads: its input gradient is reduced once; under sequence
parallelism it gets all tokens (the convolution and the scan mix tokens) and out_proj reduce-scatters.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.comm import all_reduce, all_reduce_both_ways
from .base import PlanEntry, Style
from ..runtime.grad_hooks import add_grad_hook
from ..runtime.layers import _shard_param
from ..runtime.regions import RegionInputs
from ..sharding import ShardSpec, TPSplitError, head_shards
from .conv import split_projections_and_conv

_HEAD_PARAMS = ("A_log", "D", "dt_bias")


def is_mamba2_mixer(module: nn.Module) -> bool:
    """The layout this file splits: in_proj / conv1d / out_proj, per-head A_log, D, dt_bias, and the counts."""
    ints = ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size", "conv_dim")
    if not all(isinstance(getattr(module, a, None), int) for a in ints):
        return False
    if not all(isinstance(getattr(module, p, None), nn.Parameter) for p in _HEAD_PARAMS):
        return False
    in_proj, out_proj, conv = (getattr(module, n, None) for n in ("in_proj", "out_proj", "conv1d"))
    if not (isinstance(in_proj, nn.Linear) and isinstance(out_proj, nn.Linear) and isinstance(conv, nn.Conv1d)):
        return False
    h, p, g, n, i = (module.num_heads, module.head_dim, module.n_groups, module.ssm_state_size,
                     module.intermediate_size)
    return h * p == i and module.conv_dim == i + 2 * g * n and in_proj.out_features == 2 * i + 2 * g * n + h \
        and conv.weight.shape[0] == module.conv_dim and module.A_log.shape == (h,)


def _layout(h: int, p: int, g: int, n: int, shard) -> dict[str, tuple]:
    """This rank's ranges (full coordinates) of in_proj's rows, conv1d's channels and the head-wide tensors."""
    (a, b), (c, d) = shard.q_heads, shard.kv_heads
    i = h * p
    x_bc = ((a * p, b * p), (i + c * n, i + d * n), (i + g * n + c * n, i + g * n + d * n))  # in conv_dim
    return {"in_proj": ((a * p, b * p),) + tuple((i + lo, i + hi) for lo, hi in x_bc) + ((2 * i + 2 * g * n + a,
                                                                                           2 * i + 2 * g * n + b),),
            "conv": x_bc, "heads": ((a, b),), "inner": ((a * p, b * p),)}


class Mamba2Heads(Style):
    """A Mamba-2 mixer split by heads (see the module docstring)."""
    shared_rows_collectives = "Mamba groups fewer than ranks (B/C gradients summed, norm statistics all-reduced)"

    region = RegionInputs(columns_only=True)

    def plan_entry(self, path, module, tp, attn):
        if not is_mamba2_mixer(module):
            raise TPSplitError(f"{path}: Mamba2Heads expects a Mamba-2 mixer (in_proj [z|x|B|C|dt], conv1d, A_log, "
                               f"D, dt_bias, num_heads/head_dim/n_groups/...), found {type(module).__name__}")
        h, p, g, n = module.num_heads, module.head_dim, module.n_groups, module.ssm_state_size
        shards = head_shards(h, g, tp, what=f"{path} (Mamba-2: {h} heads in {g} groups)")
        layouts = [_layout(h, p, g, n, s) for s in shards]
        full, specs = {}, [{} for _ in range(tp)]

        def add(name, tensor, dim, key):
            full[name] = tuple(tensor.shape)
            for rank, lay in enumerate(layouts):
                specs[rank][name] = ShardSpec(dim, tensor.shape[dim], lay[key])

        add("in_proj.weight", module.in_proj.weight, 0, "in_proj")
        if module.in_proj.bias is not None:
            add("in_proj.bias", module.in_proj.bias, 0, "in_proj")
        add("conv1d.weight", module.conv1d.weight, 0, "conv")
        if module.conv1d.bias is not None:
            add("conv1d.bias", module.conv1d.bias, 0, "conv")
        for name in _HEAD_PARAMS:
            add(name, getattr(module, name), 0, "heads")
        norm_weight = getattr(getattr(module, "norm", None), "weight", None)
        if isinstance(norm_weight, nn.Parameter):
            add("norm.weight", norm_weight, 0, "inner")
        add("out_proj.weight", module.out_proj.weight, 1, "inner")
        if module.out_proj.bias is not None:
            full["out_proj.bias"] = tuple(module.out_proj.bias.shape)
            for rank_specs in specs:
                rank_specs["out_proj.bias"] = None
        shared = shards[0].kv_shared
        return PlanEntry(path, self, full, specs, shared_rows=shared,
                         resolved={"shards": shards, "layouts": layouts, "counts": (h, p, g, n)})

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        specs, layout, shard = entry.specs[rank], entry.resolved["layouts"][rank], entry.resolved["shards"][rank]
        h, p, g, n = entry.resolved["counts"]
        shared = entry.shared_rows  # fewer groups than ranks: B and C rows held by several ranks
        conv = split_projections_and_conv(module, specs, group, "conv1d")
        for name in _HEAD_PARAMS:
            setattr(module, name, _shard_param(getattr(module, name), specs[name]))
        if isinstance(getattr(module, "mup_vector", None), torch.Tensor):  # Falcon-H1's per-feature multipliers
            module.mup_vector = torch.cat([module.mup_vector[..., a:b] for a, b in layout["in_proj"]], dim=-1)
        heads, groups = shard.num_q, shard.num_kv
        local_inner = heads * p
        if "norm.weight" in specs:
            module.norm = _split_norm(module.norm, specs["norm.weight"], shard, g, (h * p) // g, group, shared)
        module.num_heads, module.n_groups, module.intermediate_size = heads, groups, local_inner
        module.conv_dim = local_inner + 2 * groups * n
        if isinstance(getattr(module, "groups_time_state_size", None), int):
            module.groups_time_state_size = groups * n
        if shared:
            holders = [s.kv_heads for s in entry.resolved["shards"]].count(shard.kv_heads)
            for tensor, key, bc_start in ((module.in_proj.weight, "in_proj", 2 * h * p),
                                          (module.in_proj.bias, "in_proj", 2 * h * p),
                                          (conv.weight, "conv", h * p), (conv.bias, "conv", h * p)):
                if tensor is not None:
                    _sum_group_rows(tensor, layout[key], holders, bc_start, 2 * g * n, group)
        # the kernels' fused training path reads in_proj / norm / out_proj weights directly (no reduction):
        # the split mixer always takes the step-by-step path, whose out_proj is the row-parallel layer
        module.forward = types.MethodType(_unfused_forward, module)
        return module


def _unfused_forward(self, *args, **kwargs):
    """The mixer's own forward on its step-by-step path (its kernels' fused path is chosen in training)."""
    training = self.training
    self.training = False  # read by the mixer only to choose the fused kernel
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self.training = training


def _sum_group_rows(param: nn.Parameter, ranges, holders: int, bc_start: int, num_bc: int, group) -> None:
    """B and C rows (in_proj ranges: z, x, B, C, dt; conv1d: x, B, C) held by `holders` ranks: their gradient is
    summed over the group. Each rank writes its B and C rows into a buffer spanning B and C of every group (the
    `num_bc` = 2 G N rows from `bc_start`), at their place there (different groups land in different rows); one
    all-reduce adds the holders' contributions; each rank reads its rows back."""
    first = 2 if len(ranges) == 5 else 1
    sizes = [b - a for a, b in ranges]
    local = [(sum(sizes[:k]), sizes[k]) for k in (first, first + 1)]
    places = [ranges[k][0] - bc_start for k in (first, first + 1)]
    replicas = torch.ones(param.shape[0])
    for offset, size in local:
        replicas[offset:offset + size] = holders
    param.tp_replicas = replicas  # grad norms count each shared row once
    add_grad_hook(param, _SumRows(local, places, num_bc, group))


class _SumRows:
    """The gradient hook of `_sum_group_rows` (an object, not a closure: a deep-copied model keeps its own)."""

    def __init__(self, local, places, num_bc: int, group):
        self.local, self.places, self.num_bc, self.group = local, places, num_bc, group

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        buf = grad.new_zeros((self.num_bc, *grad.shape[1:]))
        for (offset, size), place in zip(self.local, self.places):
            buf[place:place + size] = grad[offset:offset + size]
        buf = all_reduce(buf, self.group)
        grad = grad.clone()
        for (offset, size), place in zip(self.local, self.places):
            grad[offset:offset + size] = buf[place:place + size]
        return grad


def _split_norm(norm: nn.Module, spec: ShardSpec, shard, num_groups: int, group_size: int, group, shared: bool):
    """This rank's slice of the gated norm: the model's own module with its weight sliced when it keeps whole groups,
    else a norm whose groups span ranks (statistics all-reduced)."""
    if not shared:
        norm.weight = _shard_param(norm.weight, spec)
        if isinstance(getattr(norm, "n_groups", None), int):  # Falcon-H1 counts groups, the others their size
            norm.n_groups = shard.num_kv
        return norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return _SpanningGatedNorm(norm.weight, spec, shard.kv_heads[0], num_groups, group_size, group, eps,
                              gate_first=not getattr(norm, "norm_before_gate", False))


class _SpanningGatedNorm(nn.Module):
    """Gated RMSNorm over groups that span ranks: this rank holds part of group `index`; the per-group sum of
    squares is all-reduced (each rank adds its part at its group's place), forward and backward."""

    def __init__(self, weight, spec: ShardSpec, index: int, num_groups: int, group_size: int, group, eps: float,
                 gate_first: bool):
        super().__init__()
        self.weight = _shard_param(weight, spec)
        self.index, self.num_groups, self.group_size, self.group = index, num_groups, group_size, group
        self.variance_epsilon, self.gate_first = eps, gate_first

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        if gate is not None and self.gate_first:
            x = x * F.silu(gate.float())
        place = F.one_hot(torch.tensor(self.index), self.num_groups).to(x)
        sums = all_reduce_both_ways(x.pow(2).sum(-1, keepdim=True) * place, self.group)[..., self.index:self.index + 1]
        x = x * torch.rsqrt(sums / self.group_size + self.variance_epsilon)
        if gate is not None and not self.gate_first:  # Falcon-H1 with norm_before_gate
            return (self.weight * x * F.silu(gate.float())).to(dtype)
        return self.weight * x.to(dtype)



# ---- Mamba (1): split by channels ------------------------------------------------------------------------------

def is_mamba1_mixer(module: nn.Module) -> bool:
    """Mamba's mixer (Mamba, Falcon-Mamba): in_proj [x | z], depthwise conv1d, x_proj -> [dt | B | C], dt_proj,
    A_log [I, N], D [I], out_proj."""
    ints = ("intermediate_size", "ssm_state_size", "time_step_rank")
    if not all(isinstance(getattr(module, a, None), int) for a in ints) or hasattr(module, "n_groups"):
        return False
    parts = [getattr(module, n, None) for n in ("in_proj", "x_proj", "dt_proj", "out_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts) or not isinstance(getattr(module, "conv1d", None), nn.Conv1d):
        return False
    children = {name for name, child in module.named_children() if any(True for _ in child.parameters())}
    if children - {"in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"}:
        return False  # more (Jamba's dt/B/C norms act on x_proj's output: their gradients would be partial)
    i, n, r = module.intermediate_size, module.ssm_state_size, module.time_step_rank
    return parts[0].out_features == 2 * i and parts[1].in_features == i and parts[1].out_features == r + 2 * n \
        and parts[2].out_features == i and getattr(module, "A_log", torch.empty(0)).shape == (i, n)


class MambaChannels(Style):
    """A Mamba (1) mixer split by channels: each rank keeps its channels' rows of in_proj (x and z), conv1d, dt_proj,
    A_log and D, and the matching input columns of x_proj and out_proj. x_proj mixes all channels into dt, B and C,
    which every channel's scan reads: its partial products are all-reduced in forward and the gradient of what it
    produced in backward (each rank's channels used it) - one collective each way beyond a Mamba-2 mixer's."""
    extra_collectives = "Mamba (1) x_proj: dt, B, C read from all channels (all-reduced both ways)"

    region = RegionInputs(columns_only=True)

    def plan_entry(self, path, module, tp, attn):
        if not is_mamba1_mixer(module):
            raise TPSplitError(f"{path}: MambaChannels expects a Mamba mixer (in_proj [x|z], conv1d, x_proj, dt_proj, "
                               f"A_log, D), found {type(module).__name__}")
        from ..sharding import even_ranges

        i = module.intermediate_size
        ranges = even_ranges(i, tp, what=f"{path} ({i} channels)")
        full, specs = {}, [{} for _ in range(tp)]

        def add(name, dim, rows):
            tensor = module.get_parameter(name)
            full[name] = tuple(tensor.shape)
            for rank, (a, b) in enumerate(ranges):
                specs[rank][name] = ShardSpec(dim, tensor.shape[dim], rows(a, b))

        own = lambda a, b: ((a, b),)  # noqa: E731
        for name in ("in_proj.weight", "in_proj.bias"):
            if module.get_submodule("in_proj").bias is not None or name.endswith("weight"):
                add(name, 0, lambda a, b: ((a, b), (i + a, i + b)))
        for name, dim in (("conv1d.weight", 0), ("conv1d.bias", 0), ("x_proj.weight", 1), ("dt_proj.weight", 0),
                          ("dt_proj.bias", 0), ("A_log", 0), ("D", 0), ("out_proj.weight", 1)):
            owner, _, leaf = name.rpartition(".")
            if getattr(module.get_submodule(owner) if owner else module, leaf, None) is not None:
                add(name, dim, own)
        return PlanEntry(path, self, full, specs)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        specs = entry.specs[rank]
        split_projections_and_conv(module, specs, group, "conv1d")
        _shard_own(module, specs, ("dt_proj", "x_proj", ""))
        module.x_proj.forward = types.MethodType(_x_proj_forward, module.x_proj)
        module.x_proj.tp_group = group
        module.intermediate_size = specs["D"].local_size
        module.forward = types.MethodType(_unfused_forward, module)
        return module


def _shard_own(module: nn.Module, specs: dict, owners: tuple[str, ...]) -> None:
    """Replace the parameters of `specs` held by `owners` ("" is the mixer itself) with this rank's shards."""
    for name, spec in specs.items():
        owner, _, leaf = name.rpartition(".")
        if owner in owners and spec is not None:
            holder = module.get_submodule(owner) if owner else module
            setattr(holder, leaf, _shard_param(getattr(holder, leaf), spec))


def _x_proj_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x_proj over this rank's channels: a partial sum of dt, B and C, all-reduced; its gradient too."""
    out = all_reduce_both_ways(F.linear(x, self.weight), self.tp_group)
    return out if self.bias is None else out + self.bias


# ---- Zamba (1): per-head Mamba mixers ---------------------------------------------------------------------------

def is_zamba_mixer(module: nn.Module) -> bool:
    """Zamba's mixer: Mamba with its channels in `n_mamba_heads` independent heads (per-head x_proj / dt_proj
    weights, A_log [H, P, N], D [H, P]); in_proj interleaves each channel's x and z rows."""
    ints = ("n_mamba_heads", "mamba_head_dim", "intermediate_size", "ssm_state_size", "time_step_rank")
    if not all(isinstance(getattr(module, a, None), int) for a in ints):
        return False
    h, p = module.n_mamba_heads, module.mamba_head_dim
    names = ("x_proj_weight", "dt_proj_weight", "A_log", "D")
    return h * p == module.intermediate_size and all(getattr(module, n, torch.empty(0)).shape[:1] == (h,)
                                                     for n in names) \
        and isinstance(getattr(module, "in_proj", None), nn.Linear) and module.in_proj.out_features == 2 * h * p


class ZambaHeads(Style):
    """A Zamba mixer split by its heads: nothing mixes heads between in_proj and out_proj, so each rank keeps its
    heads' interleaved x/z rows of in_proj, conv channels, per-head x_proj / dt_proj / A_log / D, and out_proj's
    matching input columns (row-parallel): Megatron's minimum."""

    region = RegionInputs(columns_only=True)

    def plan_entry(self, path, module, tp, attn):
        if not is_zamba_mixer(module):
            raise TPSplitError(f"{path}: ZambaHeads expects Zamba's per-head Mamba mixer, found {type(module).__name__}")
        from ..sharding import even_ranges

        h, p = module.n_mamba_heads, module.mamba_head_dim
        heads = even_ranges(h, tp, what=f"{path} ({h} Mamba heads)")
        rows = {"in_proj": lambda a, b: ((2 * a * p, 2 * b * p),), "conv1d": lambda a, b: ((a * p, b * p),),
                "out_proj": lambda a, b: ((a * p, b * p),), "": lambda a, b: ((a, b),)}
        full, specs = {}, [{} for _ in range(tp)]
        names = [("in_proj.weight", 0), ("in_proj.bias", 0), ("conv1d.weight", 0), ("conv1d.bias", 0),
                 ("out_proj.weight", 1), ("x_proj_weight", 0), ("dt_proj_weight", 0), ("dt_proj_bias", 0),
                 ("A_log", 0), ("D", 0)]
        for name, dim in names:
            owner, _, leaf = name.rpartition(".")
            tensor = getattr(module.get_submodule(owner) if owner else module, leaf, None)
            if tensor is None:
                continue
            full[name] = tuple(tensor.shape)
            for rank, (a, b) in enumerate(heads):
                specs[rank][name] = ShardSpec(dim, tensor.shape[dim], rows[owner](a, b))
        return PlanEntry(path, self, full, specs)

    def build(self, entry, module, rank, group, *, tied_weight=None, loss_parallel=False):
        specs = entry.specs[rank]
        split_projections_and_conv(module, specs, group, "conv1d")
        _shard_own(module, specs, ("",))
        module.n_mamba_heads = specs["D"].local_size
        module.intermediate_size = module.n_mamba_heads * module.mamba_head_dim
        module.forward = types.MethodType(_unfused_forward, module)
        return module
