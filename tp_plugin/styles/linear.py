"""Colwise / Rowwise: the plain Megatron split of a linear layer, by heads or evenly, fused parts included."""

from __future__ import annotations

from dataclasses import dataclass

from ..sharding import ShardSpec, TPSplitError, concat_specs, even_specs, head_specs
from .base import ColumnStyle, RowStyle, dims, linear_entry, need_heads


def _part_specs(path, part: str, size: int, dim: int, tp: int, attn) -> list[ShardSpec]:
    if part == "q":
        return head_specs([h.q_heads for h in attn.heads], attn.num_heads, attn.head_dim, dim)
    if part == "kv":
        return head_specs([h.kv_heads for h in attn.heads], attn.num_kv_heads, attn.head_dim, dim)
    return even_specs(size, tp, dim, what=f"{path} ({size} features)")


@dataclass(frozen=True, repr=False)
class Colwise(ColumnStyle):
    """Split the output features. `parts` name the logical pieces of a fused projection, in order:
    "q" (query heads), "kv" (key or value heads, on KV-group boundaries) or "" (an even split);
    `Colwise("q")` is a plain q_proj, `Colwise("q", "kv", "kv")` GPT-2's c_attn, `Colwise("", "")` a gate_up."""

    parts: tuple[str, ...] = ("",)

    def __init__(self, *parts: str):
        object.__setattr__(self, "parts", parts or ("",))
        bad = [p for p in self.parts if p not in ("q", "kv", "")]
        if bad:
            raise ValueError(f"Colwise parts must be 'q', 'kv' or '' (got {bad})")

    def __repr__(self) -> str:
        return f"Colwise({', '.join(repr(p) for p in self.parts)})"

    def plan_entry(self, path, module, tp, attn):
        out_features, _, out_dim, _ = dims(module)
        if any(self.parts):
            need_heads(path, self, attn)
        head_width = {"q": attn.num_heads * attn.head_dim if attn else 0,
                      "kv": attn.num_kv_heads * attn.head_dim if attn else 0}
        fixed = sum(head_width[p] for p in self.parts if p)
        even_parts = sum(1 for p in self.parts if not p)
        even_width = (out_features - fixed) // even_parts if even_parts else 0
        if fixed + even_width * even_parts != out_features:
            raise TPSplitError(f"{path}: {out_features} output features do not fit the parts {self.parts} "
                               f"(heads take {fixed}); the policy does not fit this model")
        per_part = [_part_specs(path, p, head_width[p] if p else even_width, out_dim, tp, attn) for p in self.parts]
        specs = [concat_specs([part[r] for part in per_part]) for r in range(tp)]
        shared = "kv" in self.parts and any(h.kv_shared for h in attn.heads)
        return linear_entry(path, module, self, specs, shared=shared)


@dataclass(frozen=True, repr=False)
class Rowwise(RowStyle):
    """Split the input features: "q" when the input is the attention heads' output, "" for an even split."""

    part: str = ""

    def __repr__(self) -> str:
        return f"Rowwise({self.part!r})"

    def plan_entry(self, path, module, tp, attn):
        _, in_features, _, in_dim = dims(module)
        if self.part:
            need_heads(path, self, attn)
        specs = _part_specs(path, self.part, in_features, in_dim, tp, attn)
        if specs[0].full_size != in_features:
            raise TPSplitError(f"{path}: {in_features} input features, but {attn.num_heads} heads x "
                               f"{attn.head_dim} = {specs[0].full_size}; the policy does not fit this model")
        return linear_entry(path, module, self, specs)
