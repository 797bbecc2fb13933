"""Pipeline stages of a Hugging Face causal LM, carved out of the model itself (no rewrite of its code).

A stage is the whole transformers model with what it does not run taken out:

* the decoder layers of other stages are replaced by `SkippedLayer`s (no parameters; they hand the hidden states
  on), so parameter names stay the checkpoint's (`model.layers.7...` on the second stage), and saving and
  sliced loading need no renaming;
* stages after the first take hidden states: the base model is called with `inputs_embeds=`, its embedding is
  dropped (`DroppedModule`) unless the last stage ties its head to it, and the modules the base model applies
  to the embeddings (GPT-2's position embedding and embedding dropout) become no-ops;
* stages before the last return the hidden states: the final norm becomes the identity and the head is dropped.

The base model's own forward then runs the stage's layers with its own masks and rotary positions. Families
are listed in `STAGE_SAFE` after reading their base forward: one that transforms `inputs_embeds` itself (Gemma
scales it, Granite multiplies it) would transform it again on every stage, so the others are refused.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from ..sharding import TPSplitError

# model_type -> (embedding, position embedding or None, embedding dropout or None, final norm)
STAGE_SAFE = {
    "llama": ("embed_tokens", None, None, "norm"),
    "mistral": ("embed_tokens", None, None, "norm"),
    "qwen2": ("embed_tokens", None, None, "norm"),
    "qwen3": ("embed_tokens", None, None, "norm"),
    "gpt2": ("wte", "wpe", "drop", "ln_f"),
}


class SkippedLayer(nn.Module):
    """A decoder layer of another stage: returns the hidden states as the real layer's caller expects them."""

    def __init__(self, index: int, returns_tuple: bool):
        super().__init__()
        self.index, self.returns_tuple = index, returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states

    def extra_repr(self) -> str:
        return f"layer {self.index}: on another stage"


class DroppedModule(nn.Module):
    """A module this stage does not run (the embedding after the first stage, the head before the last)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"tp_plugin pipeline: {self.what} lives on another pipeline stage")


class ZeroPositions(nn.Module):
    """A position embedding after the first stage: the first stage added it already."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


def base_and_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The base model (`model.model`, `model.transformer`), the name of its decoder-layer list, and the list."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in STAGE_SAFE:
        raise TPSplitError(f"tp_plugin.pipeline: model_type={model_type!r} is not among the families whose stages "
                           f"are carved from the model itself ({sorted(STAGE_SAFE)}); its base forward may "
                           f"transform inputs_embeds (scaling, multipliers) and would do it again on every stage")
    base = model.base_model
    lists = [(name, m) for name, m in base.named_children() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise TPSplitError(f"tp_plugin.pipeline: {type(base).__name__} has {len(lists)} module lists, expected one "
                           f"list of decoder layers")
    return base, *lists[0]


def _layers_return_tuples(base: nn.Module) -> bool:
    """Whether the base forward reads `layer(...)[0]` (transformers 4.x) or takes the layer's tensor (5.x)."""
    source = inspect.getsource(type(base).forward)
    return not re.search(r"hidden_states\s*=\s*(decoder_layer|block|layer)\(", source)


def balance(costs: list[int], stages: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Layer counts per stage, contiguous, minimising the largest stage's cost (the first stage also holds the
    embedding, `first_extra`, the last the norm and head, `last_extra`); every stage gets at least one layer."""
    n = len(costs)
    if n < stages:
        raise TPSplitError(f"tp_plugin.pipeline: {n} decoder layers cannot fill {stages} stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max cost of splitting the first i layers into s stages; cut[s][i]: where
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (first_extra if s == 1 else 0) + (last_extra if s == stages else 0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return sizes[::-1]


def layer_ranges(model: nn.Module, stages: int, split: list[int] | None) -> list[range]:
    """Each stage's decoder layers: `split` (layer counts) or balanced by parameter count."""
    base, _, layers = base_and_layers(model)
    if split is None:
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        tied = head is not None and embed is not None and head.weight is embed.weight
        split = balance([count(layer) for layer in layers], stages, count(embed), 0 if tied else count(head))
    if len(split) != stages or sum(split) != len(layers) or min(split) < 1:
        raise TPSplitError(f"tp_plugin.pipeline(split={split}): give {stages} positive layer counts adding up to "
                           f"the model's {len(layers)} decoder layers")
    starts = [sum(split[:k]) for k in range(stages)]
    return [range(a, a + n) for a, n in zip(starts, split)]


def carve(model: nn.Module, layers_kept: range, *, first: bool, last: bool) -> None:
    """Make `model` (split or not) one stage, in place: see the module docstring."""
    base, list_name, layers = base_and_layers(model)
    embed_name, positions, dropout, norm = STAGE_SAFE[model.config.model_type]
    as_tuple = _layers_return_tuples(base)
    for i in range(len(layers)):
        if i not in layers_kept:
            layers[i] = SkippedLayer(i, as_tuple)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is getattr(base, embed_name).weight
    if not first:
        if not (last and tied):
            setattr(base, embed_name, DroppedModule("the input embedding"))
        if positions is not None:
            setattr(base, positions, ZeroPositions())
        if dropout is not None:
            setattr(base, dropout, nn.Identity())
    if not last:
        setattr(base, norm, nn.Identity())
        if head is not None and not (first and tied):
            model.set_output_embeddings(DroppedModule("the LM head"))


class Stage(nn.Module):
    """One pipeline stage as `torch.distributed.pipelining` runs it: token ids or hidden states in, hidden
    states or logits out."""

    def __init__(self, model: nn.Module, *, first: bool, last: bool):
        super().__init__()
        self.model, self.first, self.last = model, first, last
        checks = getattr(model, "tp_plugin_input_checks", None)
        if checks is not None:  # `Pipeline.step` checks each batch before any stage communicates; later stages
            checks.enabled = False  # get hidden states, and the schedule's shape inference uninitialised ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        hidden = self.model.base_model(**inputs, use_cache=False)[0]
        return self.model.get_output_embeddings()(hidden) if self.last else hidden
