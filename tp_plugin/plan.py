"""A policy resolved against a concrete model: every module path with its style and per-rank shard specs.

Resolving is pure (no collectives): it runs identically on every rank, so any problem is raised on every
rank before anything is communicated. `str(plan)` is the `inspect` view.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from . import styles
from .policy import AttentionSpec, Policy
from .sharding import TPSplitError, head_shards
from .styles import ColumnStyle, RowStyle, Style, VocabEmbedding, VocabLMHead
from .styles.base import AttentionPlan, PlanEntry, is_dense


@dataclass
class Plan:
    policy_name: str
    tp_size: int
    entries: list[PlanEntry]
    attention: AttentionPlan | None
    regions: list[str]
    tied_embeddings: bool
    replicated: list[str] = field(default_factory=list)  # parameter names kept whole on every rank
    partial_grad: list[str] = field(default_factory=list)  # replicated modules whose grads are summed over TP
    kept_whole: list[str] = field(default_factory=list)  # linear layers the policy keeps replicated on purpose
    # regions found from the entries (policies that declare none; also in `regions`)
    inferred_regions: list[str] = field(default_factory=list)

    num_parameters: int = 0  # of the unsplit model
    rank_parameters: list[int] = field(default_factory=list)  # held by each TP rank (padding rows included)

    def __str__(self) -> str:
        return format_plan(self)

    def count_parameters(self, model: nn.Module) -> None:
        """Fill `num_parameters` and `rank_parameters` from the unsplit model and the shard specs."""
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.rank_parameters = [self.num_parameters] * self.tp_size
        seen = set()
        for entry in self.entries:
            module = model.get_submodule(entry.path)
            for name, full in entry.full_shapes.items():
                owner, _, leaf = name.rpartition(".")  # "in_proj.weight": a style that splits a whole module
                tensor = getattr(module.get_submodule(owner) if owner else module, leaf, None)
                if entry.specs[0].get(name) is None or id(tensor) in seen:
                    continue  # replicated, or a tied weight counted under its first entry
                seen.add(id(tensor))
                for rank in range(self.tp_size):
                    local = math.prod(entry.local_shape(rank, name))
                    self.rank_parameters[rank] += local - math.prod(full)


def _pattern(pattern: str, prefix: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\*", r"[^.]+")
    return re.compile((re.escape(prefix + ".") if prefix else "") + body)


def _matches(model: nn.Module, pattern: str, prefix: str) -> list[tuple[str, nn.Module]]:
    regex = _pattern(pattern, prefix)
    return [(name, mod) for name, mod in model.named_modules() if regex.fullmatch(name)]


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def _head_counts(config, spec: AttentionSpec) -> tuple[int, int, int]:
    def count(attr):  # a config attribute name, or the number itself (derived policies, sub-configs)
        return getattr(config, attr, None) if isinstance(attr, str) else attr

    num_heads = count(spec.num_heads)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise TPSplitError(f"the policy's attention ({spec.module}) reads its head count from "
                           f"config.{spec.num_heads}, which {type(config).__name__} does not have (or is not a "
                           f"positive integer: {num_heads!r}); give AttentionSpec(num_heads=...) the config's own "
                           f"attribute name or the number")
    num_kv = count(spec.num_kv_heads) or num_heads
    head_dim = count(spec.head_dim) or config.hidden_size // num_heads
    return num_heads, num_kv, head_dim


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, mod in model.named_modules() if mod is target), None)


def _style_names() -> list[str]:
    """The styles a policy can name: every concrete `Style` the styles package exports."""
    return [name for name in styles.__all__ if isinstance(obj := getattr(styles, name), type)
            and issubclass(obj, Style) and obj not in (Style, ColumnStyle, RowStyle)]


def plain_lookup(embed: nn.Embedding) -> bool:
    """Whether the embedding's forward is a lookup that `VocabParallelEmbedding` reproduces: nn.Embedding's own, or
    a scaled one (Gemma's `embed_scale`). A subclass doing more (Inkling's norm after the lookup) stays whole."""
    own = type(embed).forward is nn.Embedding.forward
    return own or (hasattr(embed, "embed_scale") and not any(True for _ in embed.children()))


def vocab_entries(model: nn.Module, tp_size: int) -> list[PlanEntry]:
    """The input embedding's entry, then the LM head's (if any): both split by vocabulary. An embedding whose
    forward does more than a lookup is kept whole (and a head tied to it)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_path, head_path = _path_of(model, embed), _path_of(model, head)
    if embed_path is None or not isinstance(embed, nn.Embedding):
        raise TPSplitError(f"{type(model).__name__}: no nn.Embedding input embedding found "
                           f"(get_input_embeddings() returned {type(embed).__name__})")
    split_embed = plain_lookup(embed)
    entries = [VocabEmbedding().plan_entry(embed_path, embed, tp_size, None)] if split_embed else []
    if head_path is not None and (split_embed or head.weight is not embed.weight):
        if head.weight.shape[0] != embed.weight.shape[0] and head.weight is embed.weight:
            raise TPSplitError(f"{head_path}: tied to {embed_path} but the vocabulary sizes differ")
        entries.append(VocabLMHead().plan_entry(head_path, head, tp_size, None))
    return entries


def resolve_plan(model: nn.Module, policy: Policy, tp_size: int) -> Plan:
    """Match the policy against the model and compute every rank's shards; raise on anything that does not fit."""
    prefix = _base_prefix(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    attn = None
    if policy.attention is not None:
        module = policy.attention.module
        paths = [name for name, _ in _matches(model, module, prefix)] if module is not None else []
        num_heads, num_kv, head_dim = _head_counts(model.config, policy.attention)
        heads = head_shards(num_heads, num_kv, tp_size, what=f"{model_type} attention ({policy.attention.module})")
        attn = AttentionPlan(paths, heads, head_dim, policy.attention.local_dims, num_heads, num_kv)

    entries: list[PlanEntry] = []
    for pattern, style in policy.layers.items():
        found = _matches(model, pattern, prefix)
        if not found:
            raise TPSplitError(f"policy {policy.name or model_type!r}: pattern {pattern!r} matches no module of "
                               f"{type(model).__name__}; the policy does not fit this model")
        if not isinstance(style, Style):
            raise TPSplitError(f"policy {policy.name or model_type!r}: {pattern!r} maps to {style!r}, which is not a "
                               f"style; use one of tp_plugin.styles: {', '.join(_style_names())}")
        entries.extend(style.plan_entry(path, mod, tp_size, attn) for path, mod in found)

    regions = [path for pattern in policy.regions for path, _ in _matches(model, pattern, prefix)]
    inferred = [] if regions else infer_regions(model, entries)
    for entry in entries:
        if isinstance(entry.style, ColumnStyle) and any(entry.path.startswith(r + ".") for r in regions + inferred):
            entry.sync_input_grad = False

    vocab = vocab_entries(model, tp_size)
    embeds = [e for e in vocab if isinstance(e.style, VocabEmbedding)]
    entries = embeds + entries + [e for e in vocab if e not in embeds]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight

    partial = [path for pattern in policy.partial_grad for path, _ in _matches(model, pattern, prefix)]
    kept_whole = _check_coverage(model, prefix, entries, policy)
    sharded = {f"{e.path}.{name}" for e in entries for name in e.full_shapes}
    replicated = [name for name, _ in model.named_parameters() if name not in sharded]
    plan = Plan(policy.name or model_type, tp_size, entries, attn, regions + inferred, tied, replicated, partial,
                kept_whole, inferred)
    plan.count_parameters(model)
    return plan


def infer_regions(model: nn.Module, entries: list[PlanEntry]) -> list[str]:
    """Regions of a policy that declares none (a translated `base_model_tp_plan`, the structural fallback): the
    module holding a row-parallel layer and column-parallel layers before it (an attention, an MLP), unless
    it is a whole decoder layer (an element of a ModuleList: its input is the residual stream, not what its
    projections read). Whether each column layer inside really reads the region's input is checked when it
    runs (`ColumnParallelLinear.enter`), so a projection fed by something else (MLA's q_b_proj) still syncs
    its own input gradient: inferring a region changes the collectives, never the numbers."""
    columns = [e.path for e in entries if isinstance(e.style, ColumnStyle)]
    layer_lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found = []
    for entry in entries:
        if not isinstance(entry.style, RowStyle) or "." not in entry.path:
            continue
        parent, _, _ = entry.path.rpartition(".")
        grand, _, index = parent.rpartition(".")
        in_list = grand in layer_lists and index.isdigit()
        if (in_list and not _is_sub_block(model.get_submodule(parent))) or parent in found:
            continue  # a whole decoder layer (XLM's parallel lists of attentions and FFNs are sub-blocks)
        if any(c.startswith(parent + ".") for c in columns):
            found.append(parent)
    return found


def _is_sub_block(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return any(word in name for word in ("attention", "attn", "mlp", "ffn", "feedforward"))


def _check_coverage(model, prefix, entries, policy) -> list[str]:
    """Every dense layer inside the base model is either split or deliberately replicated; returns the latter."""
    planned = {e.path for e in entries}
    planned |= {f"{e.path}.{name.rpartition('.')[0]}" for e in entries for name in e.full_shapes if "." in name}
    keep = [_pattern(p, prefix) for p in policy.replicate]
    in_base = {id(m) for m in getattr(model, "base_model", model).modules()}
    unsplit = [name for name, mod in model.named_modules()
               if is_dense(mod) and id(mod) in in_base and name not in planned]
    missed = [name for name in unsplit if not any(k.fullmatch(name) for k in keep)]
    if missed:
        raise TPSplitError(f"policy {policy.name!r} leaves {len(missed)} linear layer(s) unassigned, e.g. "
                           f"{missed[:3]}: add them to the policy's `layers` (Colwise/Rowwise) or `replicate`")
    return unsplit


def _grouped_rows(plan: Plan) -> "OrderedDict[tuple, list[str]]":
    """Rows of the inspect table, repeated blocks folded into one row (`layers.*`) with a count."""
    rows: OrderedDict[tuple, list[str]] = OrderedDict()
    for entry in plan.entries:
        generic = re.sub(r"\.\d+\.", ".*.", entry.path)
        first = next(iter(entry.full_shapes), None)  # "weight", or a custom entry's first tensor (or none)
        shapes = tuple(entry.local_shape(r, first) if first else () for r in range(plan.tp_size))
        key = (generic, repr(entry.style), entry.full_shapes.get(first, ()), shapes)
        rows.setdefault(key, []).append(entry.path)
    return rows


def format_plan(plan: Plan) -> str:
    lines = [f"tp_plugin plan: policy {plan.policy_name!r}, tp_size={plan.tp_size}"]
    if plan.attention is not None:
        a = plan.attention
        lines.append(f"attention: {a.num_heads} heads / {a.num_kv_heads} KV heads, head_dim {a.head_dim}; per rank "
                     f"q heads {[h.num_q for h in a.heads]}, KV heads {[h.num_kv for h in a.heads]}"
                     + (" (KV heads replicated)" if any(h.kv_shared for h in a.heads) else ""))
    if plan.tied_embeddings:
        lines.append("input and output embeddings tied (one vocab-parallel weight)")
    header = ["module", "style", "full weight"] + [f"rank {r}" for r in range(plan.tp_size)]
    table = [header]
    for (generic, style, full, shapes), paths in _grouped_rows(plan).items():
        name = generic if len(paths) == 1 else f"{generic} (x{len(paths)})"
        table.append([name, style, str(full)] + [str(s) for s in shapes])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    if plan.regions:
        inferred = len(plan.inferred_regions)
        lines.append(f"regions (one input reduction for the column layers inside): {len(plan.regions)}"
                     + (f", {inferred} inferred from the entries" if inferred else ""))
    lines.append(f"replicated parameters: {len(plan.replicated)} (norms, position embeddings, small heads)")
    if plan.kept_whole:
        kinds = sorted({re.sub(r"\.\d+\.", ".*.", path) for path in plan.kept_whole})
        lines.append(f"linear layers kept whole (replicated, not split): {len(plan.kept_whole)}, e.g. {kinds[:4]}")
    lines.append(f"parameter count: {plan.num_parameters:,} unsplit; held per rank "
                 f"{[f'{n:,}' for n in plan.rank_parameters]} (model.num_parameters() counts this rank's)")
    return "\n".join(lines)
