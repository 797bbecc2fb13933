"""A model's own `base_model_tp_plan` (transformers' split table) translated style by style into a Policy.

transformers' styles say how a DTensor is laid out; ours say which rows each rank keeps. The translation:

    colwise, local_colwise, packed_colwise (on a Linear)  -> Colwise: q/k/v-like ones on head boundaries
    rowwise, local_rowwise, packed_rowwise                -> Rowwise (heads' output: on head boundaries)
    moe_tp_experts (+ packed_colwise / rowwise on the     -> Experts(): each expert's MLP split along I
      experts' 3-D gate_up_proj / down_proj)
    replicated_with_grad_allreduce (norms on sharded      -> replicated, gradient summed over TP (partial_grad)
      heads)
    colwise_gather_output / colwise_rep / rowwise_rep /   -> kept whole: the model needs the full activation
      rowwise_split_input / gather / local / replicate /     there (OLMo2's full-width q norm, Phi-3's qkv
      sequence_parallel / isolated / all_reduce /            slicing), so splitting it would change results
      local_params / mla_kv_a_proj
    embedding_rowwise / vocab styles                      -> ignored: embeddings are always vocab-parallel
    grouped_gemm / ep_*                                   -> ignored (expert parallel, not TP)

Head-aware splits need to know which projection is q-like and which is kv-like: that comes from the
projection's width (heads x per-head width) and the config's head counts, never from its name. A whole
attention module is kept whole when one of its projections fits no rule (safe: replicated = unsplit).
"""

from __future__ import annotations

import re

from torch import nn

from ..policy import AttentionSpec, Colwise, Policy, Rowwise
from ..sharding import TPSplitError
from ..styles import Experts, HeadAttrs
from .common import (attention_extras, base_prefix, generic, head_config, head_dim_of, head_split,
                     is_attention, is_dense, mlp_scalars, modules, packed_qkv, text_config, with_replicated_rest)

COLWISE = {"colwise", "local_colwise", "packed_colwise"}
ROWWISE = {"rowwise", "local_rowwise", "packed_rowwise"}
EXPERTS = {"moe_tp_experts"}
PARTIAL = {"replicated_with_grad_allreduce"}
KEEP = {"colwise_gather_output", "colwise_rep", "rowwise_rep", "rowwise_split_input", "gather", "local",
        "replicate", "sequence_parallel", "isolated", "all_reduce", "local_params", "mla_kv_a_proj",
        "local_packed_rowwise", "replicated"}
IGNORE = {"embedding_rowwise", "embedding_colwise", "grouped_gemm", "ep_router", "ep_dispatch_experts",
          "vocab_parallel", "vocab_parallel_rowwise"}
UNSUPPORTED = {"moe_identity_expert"}


def tp_plan_of(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None) or getattr(getattr(model, "base_model", model), "_tp_plan", None)
    return dict(plan or {})


def translate_tp_plan(model: nn.Module, plan: dict[str, str] | None = None) -> Policy | None:
    """The Policy equivalent to `plan` (default: the model's own), or None when it has none."""
    plan = tp_plan_of(model) if plan is None else plan
    if not plan:
        return None
    prefix = base_prefix(model)
    config = text_config(model.config)
    heads_attr, kv_attr = head_config(config)
    num_heads = getattr(config, heads_attr) if heads_attr else None
    num_kv = (getattr(config, kv_attr, None) if kv_attr else None) or num_heads

    layers: dict[str, object] = {}
    partial: list[str] = []
    attn_parents: dict[str, list[tuple[str, nn.Module, bool]]] = {}  # parent pattern -> its split projections
    for pattern, style in plan.items():
        style = str(style).strip().lower()
        found = modules(model, pattern, prefix)
        if style in IGNORE or style in KEEP:
            continue
        if style in UNSUPPORTED:
            raise TPSplitError(f"{type(model).__name__}: tp_plan style {style!r} on {pattern!r} has no tp_plugin "
                               f"equivalent; register a policy for model_type={model.config.model_type!r}")
        if not found:  # a parameter of a module (the experts' 3-D tensors): covered by its module's style
            continue
        if style in EXPERTS:
            layers[pattern] = Experts()
        elif style in PARTIAL:
            pass  # norms on split heads are found structurally (attention_extras), only where heads are split
        elif style in COLWISE or style in ROWWISE:
            path, module = found[0]
            if not is_dense(module):
                continue  # e.g. `packed_colwise` on an experts module's parameter, handled by Experts()
            colwise = style in COLWISE
            parent = pattern.rpartition(".")[0]
            parent_mod = model.get_submodule(f"{prefix}.{path}".strip(".").rpartition(".")[0])
            if is_attention(parent_mod) and num_heads:
                attn_parents.setdefault(parent, []).append((pattern, found, colwise))
            elif colwise:
                layers[pattern] = Colwise("", "") if style == "packed_colwise" else Colwise()
            else:
                layers[pattern] = Rowwise()
        else:
            raise TPSplitError(f"{type(model).__name__}: unknown tp_plan style {style!r} on {pattern!r}; "
                               f"register a policy for model_type={model.config.model_type!r}")

    attention, split_kind = None, None
    for parent, projections in _per_layout(attn_parents).items():
        hd = head_dim_of(config, num_heads)
        parent_mod = next(iter(modules(model, parent, prefix)), (None, None))[1]
        packed = parent_mod is not None and packed_qkv(parent_mod)
        fused = sum(c for _, _, c in projections) == 1  # one in-projection: it may be a fused qkv
        styles = {p: head_split(p, m, num_heads, num_kv, hd, colwise=c, packed=packed, fused=fused)
                  for p, m, c in projections}
        complete = any(not c for _, _, c in projections) and any(c for _, _, c in projections)
        extras = _extras(model, prefix, parent, num_heads, num_kv, hd, styles)
        same_kind = attention is None or generic(parent) == split_kind  # one pattern's layers, one layout each
        if same_kind and complete and all(styles.values()) and extras is not None:
            split_kind = generic(parent)
            # Head attributes are patched by the HeadAttrs entries, on split attention modules only; the spec's
            # own module pattern then names none (a hybrid may hold another attention kind under `parent`).
            attention = AttentionSpec(None, num_heads=num_heads, num_kv_heads=num_kv, head_dim=hd)
            layers.update(styles)
            layers.update(extras[0])
            partial += extras[1]
    partial += mlp_scalars(model, layers, prefix)
    # one pattern per module: the plan's entry and the structural check may both name the same norm
    partial = sorted({generic(p) for p in partial}) if attention is not None else []
    return with_replicated_rest(model, Policy(name=f"{model.config.model_type} (translated tp_plan)", layers=layers,
                                              attention=attention, partial_grad=tuple(partial)))


def _per_layout(attn_parents: dict) -> dict:
    """{parent pattern: [(projection pattern, module, colwise)]}: one entry per pattern when all its layers have the
    same projection shapes, else one per layer (MiMo's sliding layers have twice the KV heads of its full ones)."""
    out: dict[str, list] = {}
    for parent, projections in attn_parents.items():
        if all(len({tuple(m.weight.shape) for _, m in found}) == 1 for _, found, _ in projections):
            out[parent] = [(pattern, found[0][1], colwise) for pattern, found, colwise in projections]
            continue
        for pattern, found, colwise in projections:
            for path, module in found:
                out.setdefault(path.rpartition(".")[0], []).append((path, module, colwise))
    return out


def _extras(model, prefix, parent, num_heads, num_kv, hd, split):
    """Per-head norms / full-width norms / head attributes of every attention module matched by `parent`."""
    styles, partial = {}, []
    split_full = _split_paths(model, split, prefix)
    for path, module in modules(model, parent, prefix):
        full = f"{prefix}.{path}" if prefix else path
        if not any(name.startswith(full + ".") for name in split_full):
            continue  # another kind of attention under the same path (MiniMax's lightning layers): left whole
        extras = attention_extras(path, module, num_heads, num_kv, hd)
        if extras is None:
            return None
        own = extras[0].pop(path, None)  # the module's own per-head parameters (HeadParams)
        styles.update(extras[0])
        partial += extras[1]
        styles[path] = HeadAttrs(*(own.names if own else ()))
    return styles, partial


def _split_paths(model, patterns, prefix) -> list[str]:
    found = []
    for pattern in patterns:
        body = re.escape(pattern).replace(r"\*", r"[^.]+")
        regex = re.compile((re.escape(prefix + ".") if prefix else "") + body)
        found += [name for name, _ in model.named_modules() if regex.fullmatch(name)]
    return found
