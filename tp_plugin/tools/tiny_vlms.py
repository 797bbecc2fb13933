"""Tiny random vision-language models (image-text-to-text) and a batch with a random image, for `tp-plugin verify`.

The text model is shrunk like a causal LM (`tiny_models`); the vision tower to 2 layers of width 32 (4 heads) on a
32 x 32 image in 8 x 8 patches, whatever its family calls those sizes. The number of image tokens in the prompt
is read off the model itself (its `get_image_features` on the random image), so no family's token arithmetic is
copied here.
"""

from __future__ import annotations

import torch

from .tiny_models import _perturb, _shrink, _sizes

VLM_TYPES = ("llava", "paligemma", "gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama")
TEXT_VOCAB = 256
IMAGE = 32  # pixels per side
PATCH = 8

_VISION = {  # vision config attribute -> tiny value (CLIP / SigLIP, Qwen2-VL, Qwen2.5/3-VL, Mllama names)
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": IMAGE, "patch_size": PATCH, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2,
    "num_global_layers": 1, "attention_heads": 4, "intermediate_layers_indices": [0], "vision_output_dim": 64,
    "num_position_embeddings": 16, "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]],
    "window_size": 16, "fullatt_block_indexes": [1], "deepstack_visual_indexes": [1],
}


def _special_ids(config: dict, vocab: int) -> dict:
    """Token ids of the config that must fit the tiny vocabulary, moved to its top (distinct, stable)."""
    ids = sorted(k for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)
                 and (k.endswith("token_id") or k.endswith("token_index")) and v >= vocab)
    return {key: vocab - 1 - i for i, key in enumerate(ids)}


def tiny_vlm_config(model_type: str, tp: int = 2):
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    text, vision = dict(defaults.get("text_config") or {}), dict(defaults.get("vision_config") or {})
    text.update(_shrink(text, sizes=_sizes(tp)))
    text.update(vocab_size=TEXT_VOCAB, use_cache=False, **_special_ids(text, TEXT_VOCAB))
    if isinstance(text.get("rope_parameters"), dict) and model_type.startswith("qwen"):  # M-RoPE: t, h, w bands
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2, 3, 3]}  # sum = head_dim / 2
    if "cross_attention_layers" in text:  # Mllama: one self-attention and one cross-attention layer
        text.update(num_hidden_layers=2, cross_attention_layers=[1])
    vision.update({k: v for k, v in _VISION.items() if k in vision})
    if "out_hidden_size" in vision or model_type == "qwen2_vl":  # Qwen: the merger projects to the text width
        vision["out_hidden_size" if "out_hidden_size" in vision else "hidden_size"] = text["hidden_size"]
    if "projection_dim" in vision:  # PaliGemma: the projector's width is the text model's
        vision["projection_dim"] = text["hidden_size"]
    kwargs = {"text_config": text, "vision_config": vision, **_special_ids(defaults, TEXT_VOCAB)}
    if "projection_dim" in defaults:
        kwargs["projection_dim"] = text["hidden_size"]
    if "mm_tokens_per_image" in defaults:  # Gemma 3 pools the 4 x 4 patches to 2 x 2 tokens
        kwargs["mm_tokens_per_image"] = 4
    if "vision_feature_layer" in defaults and isinstance(defaults["vision_feature_layer"], int):
        kwargs["vision_feature_layer"] = -1
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_vlm(model_type: str, seed: int = 0, *, tp: int = 2):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_vlm_config(model_type, tp), attn_implementation="eager")
    _perturb(model)
    return model.float().eval()


def _image_kwargs(model, batch: int, gen: torch.Generator) -> dict:
    """pixel_values (and the grid or tiling a family needs) for one random image per sample."""
    model_type = model.config.model_type
    if model_type.startswith("qwen"):  # flattened patches, [t, h, w] per image
        vision = model.config.vision_config
        temporal = getattr(vision, "temporal_patch_size", 2)
        side = IMAGE // vision.patch_size
        patches = torch.randn(batch * side * side, 3 * temporal * vision.patch_size ** 2, generator=gen)
        return {"pixel_values": patches, "image_grid_thw": torch.tensor([[1, side, side]] * batch)}
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)
    if model_type == "idefics3":
        return {"pixel_values": pixels.unsqueeze(1)}
    if model_type == "mllama":  # one image of one tile
        return {"pixel_values": pixels[:, None, None], "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),
                "aspect_ratio_mask": torch.ones(batch, 1, 1, dtype=torch.long)}
    return {"pixel_values": pixels}


def _image_token_count(model, images: dict, batch: int) -> int:
    """Image tokens per sample (one image each), as the model's own vision path produces them."""
    if model.config.model_type == "mllama":
        return 1  # cross-attention: one <|image|> token in the prompt
    kwargs = {k: v for k, v in images.items() if k != "pixel_values"}
    with torch.no_grad():
        features = model.get_image_features(images["pixel_values"], **kwargs)
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1]).shape[0] // batch


def vlm_inputs(model, batch: int = 2, text: int = 6, seed: int = 1) -> dict:
    """A prompt of image tokens then `text` random text tokens per sample, its image, and labels on the text."""
    gen = torch.Generator().manual_seed(seed)
    images = _image_kwargs(model, batch, gen)
    config = model.config
    image_id = next(getattr(config, k) for k in ("image_token_id", "image_token_index")
                    if isinstance(getattr(config, k, None), int))
    count = _image_token_count(model, images, batch)
    special = set(_special_ids(config.to_dict(), TEXT_VOCAB).values()) | {image_id}
    words = torch.tensor([t for t in range(3, TEXT_VOCAB) if t not in special])
    body = words[torch.randint(0, len(words), (batch, text), generator=gen)]
    ids = torch.cat([torch.full((batch, count), image_id), body], dim=1)
    labels = ids.masked_fill(ids == image_id, -100)
    inputs = {"input_ids": ids, "labels": labels, **images}
    if config.model_type == "mllama":
        inputs["cross_attention_mask"] = torch.ones(batch, ids.shape[1], 1, 1, dtype=torch.long)
    if config.model_type.startswith("qwen"):  # M-RoPE positions need to know which tokens are the image's
        inputs["mm_token_type_ids"] = (ids == image_id).long()
    if config.model_type in ("gemma3", "paligemma"):  # image tokens attend to each other both ways in training
        inputs["token_type_ids"] = (ids == image_id).long()
    return inputs
