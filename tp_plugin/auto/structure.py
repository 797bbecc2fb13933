"""Structural fallback: a Policy read off the module tree of a model no one wrote a policy for.

    blocks      the longest nn.ModuleList of the base model (the repeated transformer blocks)
    attention   in each block, the outermost module whose class name says Attention/Attn: its out-projection
                (named o_proj/out_proj/dense/c_proj/wo/..., output width = hidden) is row-parallel on head
                boundaries, every other projection of it (input width = hidden) column-parallel on head
                boundaries; head counts from the config (num_attention_heads / n_head / ..., and the KV count)
    MLPs        every other linear of the block: the out-projections (input X != hidden, output = hidden) are
                row-parallel, the in-projections of width X (or 2X: fused gate|up) column-parallel; per-expert
                MLPs pair up the same way; 3-D fused experts are split with Experts(); anything reading from
                the hidden state with another width (routers, gates) stays replicated
    Mamba       Mamba-2 mixers (in_proj [z|x|B|C|dt], conv1d, per-head A_log / D / dt_bias) are split by heads,
                Mamba (1) mixers by channels (`styles.mamba`); `common.with_replicated_rest` adds them to a
                translated tp_plan too

Whatever the rules cannot place safely stays replicated (a whole attention module, or a block's MLPs): the
result is still exact, only less split. Per-head norms inside a split attention get their gradients summed
over TP; full-width q/k norms become ShardedNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..policy import AttentionSpec, Colwise, Policy, Rowwise
from ..sharding import TPSplitError
from ..styles import Experts, HeadAttrs
from .common import (attention_extras, base_prefix, dims, generic, head_config, head_dim_of, head_split,
                     hidden_size_of, is_attention, is_dense, mixer_style, mlp_scalars, packed_qkv,
                     reshapes_to_input_width, text_config, with_replicated_rest)

OUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out", "proj", "out_lin", "fc_out", "attn_out",
             "o_linear", "linear_out", "output", "out_dense", "attention_output"}


def find_blocks(base: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The repeated blocks: the longest ModuleList(s) whose entries hold linear layers (XLM keeps attentions
    and MLPs in parallel lists of the same length)."""
    lists = [(name, module) for name, module in base.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0
             and any(is_dense(m) for block in module for m in block.modules())]
    longest = max((len(m) for _, m in lists), default=0)
    return [(name, module) for name, module in lists if len(module) == longest]


def structural_policy(model: nn.Module) -> Policy:
    """The fallback policy of `model`; raises TPSplitError when nothing at all can be split."""
    config = text_config(model.config)
    base = getattr(model, "base_model", model)
    found = find_blocks(base) or None
    hidden = hidden_size_of(config)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if found is None or hidden is None:
        raise TPSplitError(
            f"{type(model).__name__} (model_type={model_type!r}): no policy, no base_model_tp_plan, and the "
            f"structural fallback found " + ("no repeated blocks (nn.ModuleList of layers)" if found is None
                                             else "no hidden size on the config") +
            f". Register a policy: tp_plugin.register_policy({model_type!r}, Policy(layers={{...}}, "
            f"attention=AttentionSpec(...)))")
    blocks_path = found[0][0]
    heads_attr, kv_attr = head_config(config)
    num_heads = getattr(config, heads_attr) if heads_attr else None
    num_kv = (getattr(config, kv_attr, None) if kv_attr else None) or num_heads
    hd = head_dim_of(config, num_heads) if num_heads else None

    layers: dict[str, object] = {}
    split_attn: dict[str, tuple[dict, list]] = {}  # attention path -> (its styles, its partial-grad modules)
    for list_path, blocks in found:
        for index, block in enumerate(blocks):
            block_path = f"{list_path}.{index}" if list_path else str(index)
            attn_modules = [("", block)] if is_attention(block) else _outermost(block, is_attention)
            for name, attn in attn_modules:
                path = f"{block_path}.{name}".rstrip(".")
                split = _split_attention(path, attn, hidden, num_heads, num_kv, hd)
                if split is not None:
                    split_attn[path] = split
            in_attn = {id(m) for _, a in attn_modules for m in a.modules()}
            for name, mixer in block.named_modules():
                style = mixer_style(mixer)
                if style is not None and id(mixer) not in in_attn:
                    layers[f"{block_path}.{name}".rstrip(".")] = style
                    in_attn |= {id(m) for m in mixer.modules()}
                elif id(mixer) not in in_attn and any(isinstance(c, nn.Conv1d) for c in mixer.children()):
                    in_attn |= {id(m) for m in mixer.modules()}  # an unknown convolution mixer (GatedDeltaNet): whole
            layers.update(_split_mlps(block_path, block, hidden, in_attn))

    attention, partial = None, []
    if split_attn:
        # One head layout per policy: the most common attention path; other attention kinds stay whole.
        counts: dict[str, int] = {}
        for path in split_attn:
            counts[generic(path)] = counts.get(generic(path), 0) + 1
        pattern = max(counts, key=counts.get)
        for path, (styles, part) in split_attn.items():
            if generic(path) == pattern:
                own = styles.pop(path, None)  # the module's own per-head parameters (HeadParams)
                layers.update(styles)
                layers[path] = HeadAttrs(*(own.names if own else ()))
                partial += part
        attention = AttentionSpec(None, num_heads=num_heads, num_kv_heads=num_kv, head_dim=hd)
    if not layers:
        raise TPSplitError(
            f"{type(model).__name__} (model_type={model_type!r}): the structural fallback found no attention or "
            f"MLP it can split safely in {blocks_path}.* (no head counts on the config, or projections of "
            f"unexpected shapes). Register a policy: tp_plugin.register_policy({model_type!r}, "
            f"Policy(layers={{'layers.*.attn.q_proj': Colwise('q'), ...}}, attention=AttentionSpec(...)))")
    partial += mlp_scalars(model, layers, base_prefix(model))
    policy = Policy(name=f"{model_type} (structural fallback)", layers=layers, attention=attention,
                    partial_grad=tuple(sorted({generic(p) for p in partial})))
    return with_replicated_rest(model, policy)


def _outermost(block: nn.Module, pred) -> list[tuple[str, nn.Module]]:
    out = []
    for name, module in block.named_modules():
        if name and pred(module) and not any(name.startswith(o + ".") for o, _ in out) and \
                any(is_dense(m) for m in module.modules()):
            out.append((name, module))
    return out


def _split_attention(path, attn, hidden, num_heads, num_kv, hd):
    if not num_heads or reshapes_to_input_width(attn):
        return None
    linears = [(n, m) for n, m in attn.named_modules() if is_dense(m)]
    outs = [(n, m) for n, m in linears if dims(m)[0] == hidden and
            (n.rpartition(".")[2] in OUT_NAMES or n.split(".")[0] in ("output", "out"))]
    if len(outs) != 1:
        return None
    styles, packed = {}, packed_qkv(attn)
    fused = len(linears) == 2  # one in-projection besides the out-projection: it may be a fused qkv
    for n, m in linears:
        is_out = (n, m) == outs[0]
        if not is_out and dims(m)[1] != hidden:
            return None  # reads something other than the hidden state (low-rank MLA, gates): keep whole
        style = head_split(n, m, num_heads, num_kv, hd, colwise=not is_out, packed=packed, fused=fused)
        if style is None:
            return None
        styles[f"{path}.{n}"] = style
    extras = attention_extras(path, attn, num_heads, num_kv, hd)
    if extras is None:
        return None
    styles.update(extras[0])
    return styles, extras[1]


def _split_mlps(block_path, block, hidden, skip) -> dict[str, object]:
    """Pair the block's in-projections with its out-projections by their inner width."""
    styles: dict[str, object] = {}
    for name, module in block.named_modules():
        if id(module) in skip or not name:
            continue
        up = getattr(module, "gate_up_proj", None)
        if isinstance(up, torch.Tensor) and up.dim() == 3 and isinstance(getattr(module, "down_proj", None),
                                                                          torch.Tensor):
            styles[f"{block_path}.{name}"] = Experts()
            skip = skip | {id(m) for m in module.modules()}
    linears = [(n, m) for n, m in block.named_modules() if is_dense(m) and id(m) not in skip
               and not any(n.startswith(p[len(block_path) + 1:] + ".") for p in styles)]
    outs = [(n, m) for n, m in linears if dims(m)[0] == hidden and dims(m)[1] != hidden]
    widths = {dims(m)[1] for _, m in outs}
    for n, m in linears:
        out, inp = dims(m)
        if (n, m) in outs:
            continue
        if inp != hidden:
            return {p: s for p, s in styles.items() if isinstance(s, Experts)}  # unsure: keep the MLPs whole
    # a parameter of the width X outside the linears (BitNet's ffn_sub_norm over the intermediate activation)
    # would need the full activation: those MLPs stay whole
    others = [p for n, m in block.named_modules() if id(m) not in skip and not is_dense(m)
              for p in m.parameters(recurse=False)]
    widths -= {p.shape[-1] for p in others}
    fed = {w for w in widths if any((n, m) not in outs and (dims(m)[0] == w or dims(m)[0] == 2 * w)
                                    for n, m in linears)}
    for n, m in linears:
        out, inp = dims(m)
        if (n, m) in outs:
            if inp in fed:
                styles[f"{block_path}.{n}"] = Rowwise()
        elif out in fed:
            styles[f"{block_path}.{n}"] = Colwise()
        elif out % 2 == 0 and out // 2 in fed:
            styles[f"{block_path}.{n}"] = Colwise("", "")  # fused [gate | up]
    return styles
