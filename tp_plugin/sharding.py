"""Pure slicing math: which rows of a full tensor each tensor-parallel rank holds.

Nothing here talks to other ranks, so every rule can be checked (and printed) on every rank before any
collective runs, and tested without starting processes.

A shard is described by a `ShardSpec`: the partition dim, the full size along it, and the list of
`(start, stop)` ranges of the full tensor that the rank keeps, concatenated in that order (a fused
projection keeps one range per logical part: its q, its k, its v). Vocabulary shards may carry `pad`
zero rows at the end so that every rank's shard has the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TPSplitError(ValueError):
    """A module cannot be split at the requested tensor-parallel degree."""


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    full_size: int
    ranges: tuple[tuple[int, int], ...]
    pad: int = 0

    @property
    def local_size(self) -> int:
        return sum(stop - start for start, stop in self.ranges) + self.pad


def concat_specs(parts: list[ShardSpec]) -> ShardSpec:
    """Spec of a fused tensor whose logical parts are stacked along the same dim (q|k|v, gate|up)."""
    offset, ranges = 0, []
    for part in parts:
        ranges.extend((a + offset, b + offset) for a, b in part.ranges)
        offset += part.full_size
    return ShardSpec(parts[0].dim, offset, tuple(ranges))


def shard_tensor(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Cut this rank's shard out of the full tensor (a copy, so the full tensor can be freed)."""
    pieces = [full.narrow(spec.dim, a, b - a) for a, b in spec.ranges]
    if spec.pad:
        shape = list(full.shape)
        shape[spec.dim] = spec.pad
        pieces.append(full.new_zeros(shape))
    return torch.cat(pieces, dim=spec.dim).contiguous()


def unshard_tensor(shards: list[torch.Tensor], specs: list[ShardSpec]) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks: place every rank's ranges back into a full tensor.

    Ranges held by several ranks (replicated KV heads) are written once per holder; they are equal.
    """
    spec0 = specs[0]
    shape = list(shards[0].shape)
    shape[spec0.dim] = spec0.full_size
    full = shards[0].new_empty(shape)
    for shard, spec in zip(shards, specs):
        offset = 0
        for a, b in spec.ranges:
            full.narrow(spec.dim, a, b - a).copy_(shard.narrow(spec.dim, offset, b - a))
            offset += b - a
    return full


def even_ranges(size: int, tp_size: int, *, what: str) -> list[tuple[int, int]]:
    """Near-even contiguous chunks, the first `size % tp_size` ranks one longer (uneven splits allowed)."""
    if size < tp_size:
        raise TPSplitError(f"{what}: size {size} cannot be split over {tp_size} ranks (each rank needs at "
                           f"least one row). Use a tensor-parallel size of at most {size}.")
    base, extra = divmod(size, tp_size)
    bounds, start = [], 0
    for rank in range(tp_size):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def even_specs(size: int, tp_size: int, dim: int, *, what: str) -> list[ShardSpec]:
    return [ShardSpec(dim, size, (r,)) for r in even_ranges(size, tp_size, what=what)]


def vocab_specs(vocab_size: int, tp_size: int, dim: int = 0) -> list[ShardSpec]:
    """Equal-size vocabulary shards: ceil(vocab / tp) rows each, the last ones padded with zero rows.

    Equal sizes let the logits be all-gathered without per-rank size exchange.
    """
    per_rank = -(-vocab_size // tp_size)
    specs = []
    for rank in range(tp_size):
        start = min(rank * per_rank, vocab_size)
        stop = min(start + per_rank, vocab_size)
        specs.append(ShardSpec(dim, vocab_size, ((start, stop),), pad=per_rank - (stop - start)))
    return specs


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank keeps: a contiguous block of query heads and of KV heads."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    kv_shared: bool  # True when other ranks hold the same KV heads (tp > num_key_value_heads)

    @property
    def num_q(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def head_shards(num_heads: int, num_kv_heads: int, tp_size: int, *, what: str) -> list[HeadShard]:
    """Split attention heads on KV-group boundaries, so every rank keeps whole groups.

    9 heads / 3 KV heads at tp=2 gives 6+3 query heads (2+1 groups). When tp exceeds the KV heads, each
    group's query heads are spread over tp/kv ranks and those ranks all hold (replicate) the group's KV head.
    """
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise TPSplitError(f"{what}: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads.")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        shards = []
        for a, b in even_ranges(num_kv_heads, tp_size, what=what):
            shards.append(HeadShard((a * group, b * group), (a, b), kv_shared=False))
        return shards
    ranks_per_group = tp_size // num_kv_heads
    if tp_size % num_kv_heads or group < ranks_per_group:
        raise TPSplitError(
            f"{what}: {num_heads} query heads / {num_kv_heads} KV heads cannot be split over {tp_size} ranks: "
            f"with tp > KV heads, tp must be a multiple of the KV heads ({num_kv_heads}) and each KV group's "
            f"{group} query heads must cover tp/kv = {tp_size / num_kv_heads:g} ranks. "
            f"Valid sizes here include every tp <= {num_kv_heads}.")
    shards = []
    for kv in range(num_kv_heads):
        for a, b in even_ranges(group, ranks_per_group, what=what):
            shards.append(HeadShard((kv * group + a, kv * group + b), (kv, kv + 1), kv_shared=True))
    return shards


def head_specs(heads: list[tuple[int, int]], total_heads: int, head_dim: int, dim: int) -> list[ShardSpec]:
    """Turn per-rank head ranges into row ranges of a projection weight (head_dim rows per head)."""
    full = total_heads * head_dim
    return [ShardSpec(dim, full, ((a * head_dim, b * head_dim),)) for a, b in heads]
