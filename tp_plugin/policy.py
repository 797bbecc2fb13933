"""How an architecture is split: a small declarative table, and the registry that finds it by `model_type`.

A policy reads like transformers' `base_model_tp_plan`: module-path patterns (relative to the base model,
`*` matches one path component) mapped to a style. The embedding and the LM head need no entry: they are
found with `get_input_embeddings()` / `get_output_embeddings()` and always split by vocabulary.

    LLAMA = Policy(
        layers={"layers.*.self_attn.q_proj": Colwise("q"), ..., "layers.*.mlp.down_proj": Rowwise()},
        attention=AttentionSpec("layers.*.self_attn"),
        regions=("layers.*.self_attn", "layers.*.mlp"),
    )
    register_policy("llama", LLAMA)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .styles import Colwise, Rowwise, Style

__all__ = ["AttentionSpec", "Colwise", "Policy", "Rowwise", "get_policy", "register_policy", "registered_model_types"]


@dataclass(frozen=True)
class AttentionSpec:
    """Where the attention modules are and which config attributes count their heads.

    `local_dims` are module attributes holding `num_heads * head_dim` that the HF forward uses to split
    or reshape (GPT-2's `split_size`); they are set to this rank's width.
    """

    module: str | None  # None: the policy only needs the head counts (its HeadAttrs entries patch the modules)
    num_heads: str | int = "num_attention_heads"  # a config attribute, or the count itself
    num_kv_heads: str | int | None = "num_key_value_heads"  # None: multi-head (kv = heads); int: fixed (MQA: 1)
    head_dim: str | int | None = "head_dim"  # None or missing on the config: hidden_size // num_heads
    local_dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A model family's split. `regions` are modules whose input enters tensor-parallel compute: their
    input gradient is all-reduced once there, instead of once per column-parallel projection inside."""

    layers: dict[str, Style]
    attention: AttentionSpec | None = None
    regions: tuple[str, ...] = ()
    replicate: tuple[str, ...] = ()  # linears deliberately kept whole (e.g. MoE routers)
    # Replicated modules used *inside* the sharded region (Qwen3's per-head q/k norms): each rank sees only
    # its heads, so their gradients are partial sums and get all-reduced over the TP group.
    partial_grad: tuple[str, ...] = ()
    name: str = ""
    model_types: tuple[str, ...] = field(default=())


_REGISTRY: dict[str, Policy] = {}


def register_policy(model_type: str, policy: "Policy | Callable[[nn.Module], Policy]") -> None:
    """Register (or replace) the policy used for `config.model_type == model_type`: a Policy, or a function
    of the model returning one (for families whose layout depends on the config, e.g. Falcon), or of the model
    and the TP degree (`fn(model, tp_size)`: CodeGen, whose heads split only in multiples of 4 x tp)."""
    _REGISTRY[model_type] = policy


def get_policy(model_type: str) -> Policy | None:
    """The registered policy (the built-in families register when `tp_plugin.policies` is imported, which
    `tp_plugin.split` does)."""
    return _REGISTRY.get(model_type)


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)
