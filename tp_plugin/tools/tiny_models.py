"""Tiny random models of any transformers architecture, shrunk from its default config (for `tp-plugin verify`).

The shrinker sets the size attributes an architecture uses (their names vary: hidden_size, n_embd, d_model, ...)
to small values, keeps the kinds of layers a hybrid model mixes, and falls back to a plainer config when the
first one cannot run. Norms and biases are perturbed so that a mis-sliced bias or norm cannot hide.
"""

from __future__ import annotations

import torch

SEQ, BATCH, VOCAB = 10, 2, 128


_SIZES = {  # config attribute -> tiny value (names vary between architectures)
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64, "model_dim": 64, "n_embed": 64,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2, "n_head_kv": 2,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
    "intermediate_size": 96, "n_inner": 96, "ffn_dim": 96, "ffn_hidden_size": 96, "decoder_ffn_dim": 96,
    "encoder_ffn_dim": 96, "d_ff": 96, "inner_dim": 96, "mlp_dim": 96, "intermediate_dim": 96,
    "moe_intermediate_size": 32, "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "shared_expert_intermediate_size": 48, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "encoder_layers": 2,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "n_group": 1, "topk_group": 1, "num_group": 1,
    "first_k_dense_replace": 1,
    "rotary_dim": 8, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "laurel_rank": 8,
    "num_kv_shared_layers": 0,  # Gemma 3n
    "encoder_hash_byte_group_vocab": 256, "hidden_size_global": 64,  # BLT (its hash embedding: 500k rows)
    # Mamba-2 mixers (and the hybrids'): 8 heads of 16 over hidden 64 x expand 2, state 16
    "mamba_n_heads": 8, "n_mamba_heads": 8, "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_headdim": 16,
    "mamba_head_dim": 16, "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16, "mamba_d_ssm": 128,
    "axial_pos_embds_dim": [16, 48], "axial_pos_shape": [2, 5],  # Reformer: sum = hidden, product = seq
}
_FORCE = ("num_experts_per_tok", "n_routed_experts", "moe_intermediate_size", "head_dim")  # set even where the default is None (DeepSeek-V2: None means "all")
_LISTS = ("layer_types", "layers_block_type", "mlp_layer_types", "block_types", "attn_type_list")


_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
          "encoder_attention_heads", "swa_num_attention_heads")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "n_embed")
_MAMBA_HEADS = ("mamba_n_heads", "n_mamba_heads", "mamba_num_heads")


def _sizes(tp: int) -> dict:
    """The tiny sizes for a TP degree: 4 heads up to tp=4, else one query head per rank (hidden = 16 per head)."""
    heads = max(4, tp)
    if heads == 4:
        return _SIZES
    hidden = 16 * heads
    return {**_SIZES, **dict.fromkeys(_HEADS, heads), **dict.fromkeys(_HIDDEN, hidden),
            **dict.fromkeys(_MAMBA_HEADS, 2 * hidden // 16), "mamba_d_ssm": 2 * hidden, "hidden_size_global": hidden,
            "axial_pos_embds_dim": [16, hidden - 16]}


def _shrink(defaults: dict, keep_layer_kinds: bool = True, sizes: dict = _SIZES) -> dict:
    kwargs = {}
    for key, value in defaults.items():
        if key in sizes and (isinstance(value, (int, list)) and not isinstance(value, bool) or key in _FORCE):
            kwargs[key] = sizes[key]
        elif ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            kwargs[key] = 0.0
        elif isinstance(value, dict) and key.endswith("_config") and value:  # nested sub-config
            kwargs[key] = {**value, **_shrink(value, keep_layer_kinds, sizes)}
    if "qk_rope_head_dim" in defaults and "head_dim" in kwargs:  # MLA: head_dim is the rotary part
        kwargs["head_dim"] = _SIZES["qk_rope_head_dim"]
    if isinstance(defaults.get("expand"), int) and "num_heads" in kwargs and "head_dim" in kwargs:  # Mamba-2
        kwargs["num_heads"] = kwargs.get("hidden_size", sizes["hidden_size"]) * defaults["expand"] // kwargs["head_dim"]
    heads, kv = defaults.get("num_attention_heads"), defaults.get("num_key_value_heads")
    if "is_decoder" in defaults:  # encoder families used as causal LMs (BERT, Reformer, ...)
        kwargs["is_decoder"] = True
    if "num_key_value_heads" in defaults:
        if kv is None or kv == heads:  # multi-head (and MLA) attention stays multi-head
            kwargs["num_key_value_heads"] = sizes["num_attention_heads"]
        elif kv == 1:  # multi-query stays multi-query
            kwargs["num_key_value_heads"] = 1
    layers = kwargs.get("num_hidden_layers", 2)
    for key in _LISTS:
        if isinstance(defaults.get(key), list) and defaults[key]:
            kinds = list(dict.fromkeys(defaults[key]))[:4] if keep_layer_kinds else []
            kwargs[key] = kinds if len(kinds) > 1 else defaults[key][:layers]
            if "num_hidden_layers" in defaults:
                kwargs["num_hidden_layers"] = len(kwargs[key])
    full_depth = defaults.get("num_hidden_layers")
    for key, value in defaults.items():  # other per-layer lists (Gemma 3n's activation_sparsity_pattern)
        if isinstance(value, list) and len(value) == full_depth and key not in kwargs and full_depth > 1:
            kwargs[key] = value[:kwargs.get("num_hidden_layers", layers)]
    if isinstance(defaults.get("attention_types"), list):  # GPT-Neo: [[["global", "local"], n_repeats]]
        kwargs["attention_types"] = [[["global", "local"], 1]]
    return kwargs


def tiny_config(model_type: str, *, keep_layer_kinds: bool = True, tp: int = 2):
    """The default config of `model_type`, shrunk: 2 layers, hidden 64, 4 heads / 2 KV heads, vocab 128 (for
    tp=8: 8 heads, hidden 128, still 2 KV heads, so each rank keeps one query head and a replicated KV head).

    With `keep_layer_kinds`, per-layer type lists (hybrid models) keep one layer of each kind."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    kwargs = _shrink(defaults, keep_layer_kinds, _sizes(tp))
    for key, value in defaults.items():  # special token ids must fit the tiny vocabulary
        if key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = VOCAB - 1 - (sum(map(ord, key)) % 8)
        elif key.endswith("token_id") and isinstance(value, list):
            kwargs[key] = [v if v < VOCAB else VOCAB - 1 for v in value]
    kwargs["use_cache"] = False
    return AutoConfig.for_model(model_type, **kwargs)


def _perturb(model) -> None:
    """Random norms and biases (per-expert biases too): HF initialises them to 1 / 0, which would hide a
    mis-sliced or twice-added bias or norm."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (param.dim() == 1 or name.endswith("bias")) and param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * 0.1)


def build_tiny(model_type: str, seed: int = 0, *, tp: int = 2):
    """A seeded tiny model (sized for `tp`); the first shrunk config whose unsplit model runs forward is used."""
    from transformers import AutoModelForCausalLM

    error = None
    for keep in (True, False):
        try:
            config = tiny_config(model_type, keep_layer_kinds=keep, tp=tp)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            _perturb(model)
            model = model.float().eval()
            with torch.no_grad():
                model(input_ids=torch.arange(3, 3 + SEQ).remainder(VOCAB).unsqueeze(0))
            return model
        except Exception as exc:  # noqa: BLE001  (try the next, plainer config)
            error = error or exc
    raise error


def load_local(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
