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

import inspect
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from .policy import AttentionSpec, Colwise, Policy, Rowwise
from .sharding import TPSplitError
from .styles import Experts, HeadColwise, HeadRowwise

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

NO_MODULE = "(patched by HeadAttrs)"  # an AttentionSpec.module pattern that matches no module
HEAD_ATTRS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
              "num_attention_heads_per_layer")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "n_head_kv")


def is_dense(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a transposed GPT-2 Conv1D."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


def generic(path: str) -> str:
    """`layers.3.self_attn.q_proj` -> `layers.*.self_attn.q_proj` (the policy pattern for every block)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path)


def text_config(config):
    """The config holding the language model's sizes (a multimodal model's `text_config`, else itself)."""
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else None
    return text if text is not None else config


def head_config(config) -> tuple[str | None, str | None]:
    """Names of the config attributes counting query heads and KV heads (None when absent)."""
    heads = next((a for a in HEAD_ATTRS if isinstance(getattr(config, a, None), int)), None)
    kv = next((a for a in KV_ATTRS if isinstance(getattr(config, a, None), int)), None)
    return heads, kv


def packed_qkv(attention: nn.Module) -> bool:
    """Whether a fused multi-head qkv is laid out [q | k | v] (split or chunked after the projection, as GPT-1,
    MPT) rather than per head [h0: q k v | h1: ...] (viewed as (..., heads, 3 * head_dim), as GPT-NeoX)."""
    try:
        src = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    per_head = re.search(r"3\s*\*\s*self\.head|,\s*3\s*,\s*self\.head|3\s*\*\s*head_dim", src)
    return not per_head and bool(re.search(r"\.split\(|\.chunk\(3|torch\.split\(", src))


def head_split(path: str, module: nn.Module, num_heads: int, num_kv: int, head_dim: int, *, colwise: bool,
               packed: bool = False, fused: bool = True):
    """The head-aware style of one attention projection, or None when its width fits no head rule."""
    out, inp = dims(module)
    if not colwise:
        return HeadRowwise() if inp % num_heads == 0 else None
    if out == num_heads * head_dim:
        return HeadColwise("q")
    if num_kv != num_heads and out == num_kv * head_dim:
        return HeadColwise("kv")
    if fused and out == (num_heads + 2 * num_kv) * head_dim and (num_kv != num_heads or packed):
        return Colwise("q", "kv", "kv")  # fused [q | k | v] (Phi-3 qkv_proj, GPT-BigCode c_attn, MPT Wqkv)
    if out % num_heads == 0:  # any per-head width: MLA projections, per-head interleaved q|k|v
        return HeadColwise("q")
    if out % num_kv == 0:
        return HeadColwise("kv")
    return None


def head_dim_of(config, num_heads: int) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // num_heads


def base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    return next((name for name, mod in model.named_modules() if mod is base), "")


def _modules(model: nn.Module, pattern: str, prefix: str) -> list[tuple[str, nn.Module]]:
    body = re.escape(pattern).replace(r"\*", r"[^.]+")
    regex = re.compile((re.escape(prefix + ".") if prefix else "") + body)
    cut = len(prefix) + 1 if prefix else 0
    return [(name[cut:], mod) for name, mod in model.named_modules() if regex.fullmatch(name)]


def is_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


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
        found = _modules(model, pattern, prefix)
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
                attn_parents.setdefault(parent, []).append((pattern, module, colwise))
            elif colwise:
                layers[pattern] = Colwise("", "") if style == "packed_colwise" else Colwise()
            else:
                layers[pattern] = Rowwise()
        else:
            raise TPSplitError(f"{type(model).__name__}: unknown tp_plan style {style!r} on {pattern!r}; "
                               f"register a policy for model_type={model.config.model_type!r}")

    attention = None
    for parent, projections in attn_parents.items():
        hd = head_dim_of(config, num_heads)
        parent_mod = next(iter(_modules(model, parent, prefix)), (None, None))[1]
        packed = parent_mod is not None and packed_qkv(parent_mod)
        fused = sum(c for _, _, c in projections) == 1  # one in-projection: it may be a fused qkv
        styles = {p: head_split(p, m, num_heads, num_kv, hd, colwise=c, packed=packed, fused=fused)
                  for p, m, c in projections}
        complete = any(not c for _, _, c in projections) and any(c for _, _, c in projections)
        extras = _extras(model, prefix, parent, num_heads, num_kv, hd, styles)
        if attention is None and complete and all(styles.values()) and extras is not None:
            # Head attributes are patched by the HeadAttrs entries, on split attention modules only; the spec's
            # own module pattern then names none (a hybrid may hold another attention kind under `parent`).
            attention = AttentionSpec(NO_MODULE, num_heads=num_heads, num_kv_heads=num_kv, head_dim=hd)
            layers.update(styles)
            layers.update(extras[0])
            partial += extras[1]
    partial += mlp_scalars(model, layers, prefix)
    # one pattern per module: the plan's entry and the structural check may both name the same norm
    partial = sorted({generic(p) for p in partial}) if attention is not None else []
    return with_replicated_rest(model, Policy(name=f"{model.config.model_type} (translated tp_plan)", layers=layers,
                                              attention=attention, partial_grad=tuple(partial)))


def _extras(model, prefix, parent, num_heads, num_kv, hd, split):
    """Per-head norms / full-width norms / head attributes of every attention module matched by `parent`."""
    from .fallback import HeadAttrs, attention_extras

    styles, partial = {}, []
    split_full = _split_paths(model, split, prefix)
    for path, module in _modules(model, parent, prefix):
        full = f"{prefix}.{path}" if prefix else path
        if not any(name.startswith(full + ".") for name in split_full):
            continue  # another kind of attention under the same path (MiniMax's lightning layers): left whole
        extras = attention_extras(path, module, num_heads, num_kv, hd)
        if extras is None:
            return None
        styles.update(extras[0])
        partial += extras[1]
        styles[path] = HeadAttrs()
    return styles, partial


def _split_paths(model, patterns, prefix) -> list[str]:
    found = []
    for pattern in patterns:
        body = re.escape(pattern).replace(r"\*", r"[^.]+")
        regex = re.compile((re.escape(prefix + ".") if prefix else "") + body)
        found += [name for name, _ in model.named_modules() if regex.fullmatch(name)]
    return found


def mlp_scalars(model: nn.Module, layers: dict, prefix: str) -> list[str]:
    """Learnable scalars of activations inside split MLPs (Apertus' xIELU alpha): they act on this rank's
    slice of the intermediate activation only, so their gradients are partial sums (summed over TP)."""
    found = []
    for pattern, style in layers.items():
        if not isinstance(style, Rowwise) or style.part:
            continue
        for path, _ in _modules(model, pattern, prefix):
            parent_path = path.rpartition(".")[0]
            parent = model.get_submodule(f"{prefix}.{parent_path}".strip(".")) if parent_path else None
            if parent is None or is_attention(parent) or parent_path == "":
                continue
            for name, sub in parent.named_modules():
                own = list(sub.parameters(recurse=False))
                if name and not is_dense(sub) and own and all(p.numel() == 1 for p in own):
                    found.append(f"{parent_path}.{name}")
    return found


def with_replicated_rest(model: nn.Module, policy: Policy) -> Policy:
    """`policy` plus every dense layer of the base model it does not split, listed as deliberately replicated."""
    from dataclasses import replace

    prefix = base_prefix(model)
    planned = set()
    for pattern in policy.layers:
        planned |= {path for path, _ in _modules(model, pattern, prefix)}
    base = getattr(model, "base_model", model)
    owners = set()  # modules whose own style covers their children (fused experts)
    for pattern, style in policy.layers.items():
        if isinstance(style, Experts):
            owners |= {path for path, _ in _modules(model, pattern, prefix)}
    rest = sorted({generic(name) for name, mod in base.named_modules() if is_dense(mod) and name not in planned
                   and not any(name.startswith(p + ".") for p in owners)})
    return replace(policy, replicate=tuple(policy.replicate) + tuple(rest))
