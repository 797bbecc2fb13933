"""A plan's typed entry: one module, the style object that splits it, its activation layouts, every rank's shards.

Kept apart from `plan.py` so that styles (which make entries) and the plan (which collects them) do not import
each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sharding import HeadShard, ShardSpec

if TYPE_CHECKING:
    from .styles.base import Style


class Layout(enum.Enum):
    """How an activation is laid out over the TP group at a module's input or output."""

    REPLICATED = "replicated"  # every rank holds the whole tensor
    SHARD_HIDDEN = "sharded on hidden"  # each rank holds its slice of the last (feature / head) dim
    SHARD_SEQUENCE = "sharded on sequence"  # each rank holds its slice of the tokens (sequence parallelism)


@dataclass
class PlanEntry:
    path: str
    style: Style
    full_shapes: dict[str, tuple[int, ...]]
    specs: list[dict[str, ShardSpec | None]]  # per TP rank: tensor name -> spec (None: replicated)
    transposed: bool = False  # a GPT-2 Conv1D weight, [in, out]
    shared_rows: bool = False  # replicated KV heads: gradient summed over the ranks holding them
    sync_input_grad: bool = True  # False inside a region, which syncs its input gradient once
    resolved: dict = field(default_factory=dict)  # what the style worked out at plan time for `build`

    @property
    def input_layout(self) -> Layout:
        return self.style.input_layout

    @property
    def output_layout(self) -> Layout:
        return self.style.output_layout

    def local_shape(self, rank: int, name: str) -> tuple[int, ...]:
        shape, spec = list(self.full_shapes[name]), self.specs[rank][name]
        if spec is not None:
            shape[spec.dim] = spec.local_size
        return tuple(shape)


@dataclass
class AttentionPlan:
    paths: list[str]  # the attention modules whose head counts are patched (none when HeadAttrs entries do it)
    heads: list[HeadShard]
    head_dim: int
    local_dims: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
