"""What PEFT may do to a split model, checked before PEFT touches it (identical on every rank, no collective).

Supported: LoRA (with rslora, dropout, lora_bias, DoRA) on the column- and row-parallel linears, LoRA (not DoRA) on
the vocabulary-parallel embedding, `trainable_token_indices` on it, IA3 on the parallel linears, and
`modules_to_save` of the parallel layers (the LM head included: a split copy, saved unsplit). Everything else
is refused with a message naming the module or option and the fix, because it would otherwise train with wrong
gradients or fail obscurely inside PEFT.
"""

from __future__ import annotations

import dataclasses

from peft import PeftType
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from ...runtime.layers import PARALLEL_LAYERS, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ...sharding import TPSplitError

SUPPORTED_METHODS = (PeftType.LORA, PeftType.IA3)
_SUPPORTED_INITS = (True, False, "gaussian")


def unsupported(what: str, fix: str) -> TPSplitError:
    return TPSplitError(f"unsupported on a tensor-parallel model (tp_plugin): {what}. {fix}")


def check_method(model: nn.Module, config) -> None:
    """Only LoRA and IA3 have TP-aware layers; anything else would train with wrong gradients or fail obscurely."""
    peft_type = getattr(config, "peft_type", None)
    if peft_type not in SUPPORTED_METHODS:
        name = getattr(peft_type, "value", peft_type)
        split = [n for n, m in model.named_modules() if isinstance(m, PARALLEL_LAYERS)]
        has_targets = bool(getattr(config, "target_modules", None))
        targeted = [n for n in split if has_targets and check_target_module_exists(config, n)]
        where = f"the split layers {targeted}" if targeted else f"a split model ({len(split)} split layers)"
        raise unsupported(f"PEFT method {name} ({type(config).__name__}) on {where}",
                          "tp_plugin supports LoRA (peft.LoraConfig, also with use_dora=True) and IA3 "
                          f"(peft.IA3Config) on split models; use one of those, or apply {name} to the unsplit "
                          "model without tp_plugin.parallelize")


def _check_lora_options(config) -> None:
    variants = [f.name for f in dataclasses.fields(config)
                if f.metadata.get("is_lora_variant") and getattr(config, f.name) and f.name != "use_dora"]
    if variants:
        raise unsupported(f"LoRA variant option(s) {variants}",
                          "plain LoRA (with lora_alpha, use_rslora, lora_dropout, lora_bias) and DoRA (use_dora) "
                          "are supported; unset those options")
    if config.init_lora_weights not in _SUPPORTED_INITS:
        raise unsupported(f"init_lora_weights={config.init_lora_weights!r} (it needs the full base weight "
                          f"or data)", f"use one of {list(_SUPPORTED_INITS)}")
    for option in ("target_parameters", "layer_replication"):
        if getattr(config, option, None):
            raise unsupported(f"LoraConfig.{option}={getattr(config, option)!r}", f"leave {option} unset")


def _check_targets(model: nn.Module, config) -> None:
    """Every module the config targets (or keeps trainable) must be one we can adapt split."""
    is_lora = config.peft_type == PeftType.LORA
    saved = list(config.modules_to_save or [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_head = head is not None and getattr(head, "weight", None) is getattr(model.get_input_embeddings(), "weight",
                                                                              None)
    for name, module in model.named_modules():
        if name and any(name == s or name.endswith("." + s) for s in saved):
            _check_module_to_save(name, module)
        if not name or not isinstance(module, PARALLEL_LAYERS) or isinstance(module, (ColumnParallelLinear,
                                                                                      RowParallelLinear)):
            continue
        # no target_modules: PEFT fills them in later from its per-architecture table (attention / MLP linears)
        if config.target_modules is None or not check_target_module_exists(config, name):
            continue
        what = f"{type(config).__name__} on {name} ({type(module).__name__}, split by vocabulary)"
        if not (is_lora and isinstance(module, VocabParallelEmbedding)):
            raise unsupported(what, "tp_plugin adapts the split linears (q_proj, v_proj, ..., or 'all-linear') with "
                                    "LoRA, DoRA or IA3, and the input embedding with plain LoRA or "
                                    "trainable_token_indices; remove this module from target_modules")
        if config.use_dora:
            raise unsupported(f"DoRA (use_dora=True) on {name} ({type(module).__name__})",
                              "plain LoRA adapts the vocabulary-parallel embedding and DoRA the parallel linears: "
                              "leave the embedding out of target_modules, or unset use_dora")
        if getattr(config, "ensure_weight_tying", False) and tied_head:
            raise unsupported(f"ensure_weight_tying=True with {name} targeted: it adds LoRA to the tied LM head "
                              f"({type(head).__name__}), which tp_plugin does not adapt",
                              "leave ensure_weight_tying unset (the head then keeps the base tied weight, as in "
                              "plain PEFT without it)")


def _check_module_to_save(name: str, module: nn.Module) -> None:
    """PEFT trains a deep copy of each module to save. A parallel layer copies onto its own groups, with its tags
    (`tp_plugin.runtime.copies`), trains as a split copy and is saved gathered; a module that holds split modules inside
    (an attention, an MLP) would copy with its region's state half shared with the original's."""
    if isinstance(module, PARALLEL_LAYERS):
        return
    inner = [n for n, m in module.named_modules() if n and type(m).__module__.startswith("tp_plugin")]
    if inner or type(module).__module__.startswith("tp_plugin"):
        where = f"{name}.{inner[0]}" if inner else name
        raise unsupported(f"modules_to_save containing {name} ({type(module).__name__}), which holds split modules "
                          f"({inner[:3] or [type(module).__name__]})",
                          f"name the split layers themselves in modules_to_save (e.g. {where!r}), or adapt them "
                          f"with LoRA")


def _check_trainable_tokens(model: nn.Module, config) -> None:
    """`trainable_token_indices` rewrites rows of an embedding (or LM head) weight: a vocabulary-split one has TP
    token layers; a split linear's weight rows are not tokens."""
    indices = getattr(config, "trainable_token_indices", None)
    for key in indices if isinstance(indices, dict) else ():
        for name, module in model.named_modules():
            if name.endswith(key) and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                raise unsupported(f"trainable_token_indices on {name} ({type(module).__name__})",
                                  "name the input embedding (or the LM head) in trainable_token_indices")


def _resolve_all_linear(model: nn.Module, config) -> None:
    """PEFT's 'all-linear' picks nn.Linear/Conv1D by type; add the parallel linears (the LM head is a
    VocabParallelLMHead, so it stays excluded as PEFT excludes it)."""
    if not (isinstance(config.target_modules, str)
            and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    _maybe_include_all_linear_layers(config, model)  # nn.Linear/Conv1D left in the model, minus the heads
    config.target_modules = set(config.target_modules) | {
        name for name, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}


def prepare(model: nn.Module, config) -> None:
    """Checks and registration (LoRA's custom-module mapping; IA3 dispatches through `patches.py`)."""
    from .embedding import LORA_EMBEDDINGS
    from .layers import LORA_LAYERS

    check_method(model, config)
    if config.peft_type == PeftType.LORA:
        _check_lora_options(config)
    _resolve_all_linear(model, config)
    _check_targets(model, config)
    if config.peft_type == PeftType.LORA:
        _check_trainable_tokens(model, config)
        config._register_custom_module({**LORA_LAYERS, **LORA_EMBEDDINGS})
