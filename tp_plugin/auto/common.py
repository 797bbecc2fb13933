"""What the translated plans and the structural fallback share: reading dims, head counts and paths off a model,
and the rules for the extras of a split attention (per-head norms, full-width norms)."""

from __future__ import annotations

import inspect
import re
from dataclasses import replace

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..policy import Colwise, Policy, Rowwise
from ..styles import (Experts, HeadColwise, HeadParams, HeadRowwise, Mamba2Heads, MambaChannels, ShardedNorm,
                      ShortConvChannels)
from ..styles.activations import ActivationSparsity, has_activation_sparsity
from ..styles.heads import CONFIG_COUNT, CONFIG_KV, COUNT
from ..styles.conv import is_short_conv
from ..styles.mamba import ZambaHeads, is_mamba1_mixer, is_mamba2_mixer, is_zamba_mixer



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
    heads = next((a for a in CONFIG_COUNT if isinstance(getattr(config, a, None), int)), None)
    kv = next((a for a in CONFIG_KV if isinstance(getattr(config, a, None), int)), None)
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


def reshapes_to_input_width(attention: nn.Module) -> bool:
    """Whether the forward reads its output width off its input (`bsz, tgt_len, embed_dim = hidden_states.size()`,
    then `.reshape(..., embed_dim)`: TrOCR, ProphetNet): split by heads, its output is narrower than its input, so
    it can only stay whole (no attribute holds that width)."""
    try:
        src = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    found = re.search(r"\w+\s*,\s*\w+\s*,\s*(\w+)\s*=\s*hidden_states\.(?:size\(\)|shape)", src)
    return bool(found) and bool(re.search(rf"\.(?:reshape|view)\([^)]*\b{found.group(1)}\s*\)", src))


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
    if out % head_dim == 0 and num_kv < out // head_dim < num_heads:
        return None  # a KV count the config does not state (MiMo's sliding layers have twice its KV heads): whole
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


def modules(model: nn.Module, pattern: str, prefix: str) -> list[tuple[str, nn.Module]]:
    body = re.escape(pattern).replace(r"\*", r"[^.]+")
    regex = re.compile((re.escape(prefix + ".") if prefix else "") + body)
    cut = len(prefix) + 1 if prefix else 0
    return [(name[cut:], mod) for name, mod in model.named_modules() if regex.fullmatch(name)]


def is_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()  # not a whole layer named after its attention (MllamaSelfAttentionDecoderLayer)
    return ("attention" in name or "attn" in name) and not name.endswith(("layer", "block"))


def mlp_scalars(model: nn.Module, layers: dict, prefix: str) -> list[str]:
    """Learnable scalars of activations inside split MLPs (Apertus' xIELU alpha): they act on this rank's
    slice of the intermediate activation only, so their gradients are partial sums (summed over TP)."""
    found = []
    for pattern, style in layers.items():
        if not isinstance(style, Rowwise) or style.part:
            continue
        for path, _ in modules(model, pattern, prefix):
            parent_path = path.rpartition(".")[0]
            parent = model.get_submodule(f"{prefix}.{parent_path}".strip(".")) if parent_path else None
            if parent is None or is_attention(parent) or parent_path == "":
                continue
            for name, sub in parent.named_modules():
                own = list(sub.parameters(recurse=False))
                if name and not is_dense(sub) and own and all(p.numel() == 1 for p in own):
                    found.append(f"{parent_path}.{name}")
    return found


def mixer_style(module: nn.Module):
    """The style of a state-space or convolution mixer the derived policies split (None: not one)."""
    for test, style in ((is_mamba2_mixer, Mamba2Heads), (is_zamba_mixer, ZambaHeads),
                        (is_mamba1_mixer, MambaChannels), (is_short_conv, ShortConvChannels)):
        if test(module):
            return style()
    return None


def with_replicated_rest(model: nn.Module, policy: Policy) -> Policy:
    """`policy` plus the token mixers it leaves alone (Mamba and short-convolution mixers, split), the statistics of
    split MLPs (Gemma 3n's activation sparsity), plus every dense layer of the base model it does not split, listed
    as deliberately replicated."""
    prefix = base_prefix(model)
    planned = set()
    for pattern in policy.layers:
        planned |= {path for path, _ in modules(model, pattern, prefix)}
    base = getattr(model, "base_model", model)
    mixers = {name: mixer_style(mod) for name, mod in base.named_modules()
              if mixer_style(mod) is not None and not any(p == name or p.startswith(name + ".") for p in planned)}
    mixers |= {name: ActivationSparsity() for name, mod in base.named_modules()  # its gate's statistics span ranks
               if has_activation_sparsity(mod) and mod.activation_sparsity > 0 and f"{name}.gate_proj" in planned}
    if mixers:
        policy = replace(policy, layers={**policy.layers, **mixers})
        planned |= set(mixers)
    owners = set()  # modules whose own style covers their children (fused experts, Mamba-2 mixers)
    for pattern, style in policy.layers.items():
        if isinstance(style, (Experts, Mamba2Heads, MambaChannels, ShortConvChannels, ZambaHeads)):
            owners |= {path for path, _ in modules(model, pattern, prefix)}
    rest = sorted({generic(name) for name, mod in base.named_modules() if is_dense(mod) and name not in planned
                   and not any(name.startswith(p + ".") for p in owners)})
    return replace(policy, replicate=tuple(policy.replicate) + tuple(rest))


HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "model_dim", "hidden_dim")


def hidden_size_of(config) -> int | None:
    return next((getattr(config, a) for a in HIDDEN_ATTRS if isinstance(getattr(config, a, None), int)), None)


def attention_extras(attn_path: str, module: nn.Module, num_heads: int, num_kv: int, head_dim: int):
    """Non-linear parameters of an attention module to be split: ({path: style}, partial-grad paths), or None
    when some parameter has a per-head layout the rules cannot place (then the attention stays whole)."""
    counts = {getattr(module, a) for a in COUNT if isinstance(getattr(module, a, None), int)}
    if counts - {num_heads}:  # its own head count differs from the config's (Laguna's per-layer heads): whole
        return None
    styles, partial = {}, []
    for name, sub in module.named_modules():
        if is_dense(sub):
            continue
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        path = f"{attn_path}.{name}" if name else attn_path
        sizes = {p.shape[-1] for _, p in own}
        if not name and all(p.dim() == 1 and p.shape[0] == num_heads for _, p in own):
            if any(is_dense(m) and dims(m)[0] == num_heads for m in module.modules()):
                return None  # they act on a projection to one value per head (Doge's A on dt_proj): keep whole
            styles[path] = HeadParams(*(n for n, _ in own))  # per-head logits of the module itself (sinks)
        elif sizes == {head_dim} and all(p.dim() == 1 for _, p in own) and "norm" in type(sub).__name__.lower():
            partial.append(path)  # per-head norm (Qwen3's q_norm): acts on this rank's heads only
        elif len(own) == 1 and own[0][0] == "weight" and own[0][1].dim() == 1 and name and \
                "norm" in type(sub).__name__.lower() and "rms" in type(sub).__name__.lower():
            size = own[0][1].shape[0]
            if size == num_heads * head_dim:
                styles[path] = ShardedNorm("q")
            elif size == num_kv * head_dim:
                styles[path] = ShardedNorm("kv")
            else:
                return None
        else:
            return None
    return styles, partial
