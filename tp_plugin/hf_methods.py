"""The HF methods whose meaning changes when a model is split, rebound on the split model itself.

`parallelize` binds these on the model instance (the way TRL binds its fused forward), so every client that
calls them, a user, the Trainer or TRL, gets the unsplit model's behaviour or a clear error:

* `save_pretrained(dir)`: the ordinary consolidated checkpoint (`tp_plugin.save_pretrained`), written by
  global rank 0 while every rank sends its shards. Called on fewer ranks than the world (`if rank == 0:`, as
  on one GPU), it raises on the ranks that called it after a bounded wait and writes nothing.
* `generate(...)`: the ranks of a TP group must pass the same prompts (checked, one all-gather of 8 bytes, an
  error on every rank otherwise), and every rank starts from TP rank 0's RNG state (one small broadcast), so
  `do_sample=True` draws the same tokens on every rank even after per-rank seeding. Called on fewer ranks of
  the TP group (`if rank == 0: model.generate(...)`), it raises after a bounded wait, like a save; replicas may
  call it different numbers of times.
* `resize_token_embeddings(n)`: transformers' own resize on the gathered vocabulary (same new rows as the
  unsplit model, drawn from the shared RNG state), then split again by vocabulary.

`num_parameters()` is left alone: it counts this rank's parameters, which is what the Trainer's FLOP count
(summed over ranks) needs; `tp_plugin.inspect(model)` prints the unsplit count next to every rank's.
`copy.deepcopy` rebinds these methods to the copy (the copy itself: `tp_plugin.runtime.copies`).
"""

from __future__ import annotations

import contextlib
import types

from torch import nn

from .runtime import rng
from .apply import split_vocab
from .checkpoint.save import save_pretrained as save_consolidated
from .checks import install_input_checks
from .runtime.arrival import arrive_together
from .runtime.comm import gather_whole
from .runtime.layers import VocabParallelEmbedding, VocabParallelLMHead
from .sharding import TPSplitError
from .state import tp_state


def bind(model: nn.Module) -> None:
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)
    if model.can_generate():
        model.generate = types.MethodType(generate, model)


def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                    max_shard_size="5GB", **kwargs):
    """`PreTrainedModel.save_pretrained` for a split model: call it on every rank (see the module docstring)."""
    if state_dict is not None:
        raise TPSplitError("save_pretrained(state_dict=...) on a split model: a state dict of this rank holds only "
                           "its shards. Call model.save_pretrained(dir) on every rank without state_dict; it writes "
                           "the ordinary, unsplit checkpoint")
    if push_to_hub:
        raise TPSplitError("save_pretrained(push_to_hub=True) on a split model: save on every rank first, then push "
                           "the directory from one process (huggingface_hub.upload_folder)")
    save_consolidated(self, save_directory, max_shard_size=max_shard_size)


def generate(self, *args, **kwargs):
    """`GenerationMixin.generate`, after giving every rank of the TP group TP rank 0's RNG state; a sequence-
    parallel model generates on the plain TP path (decode steps have one token)."""
    state = tp_state(self)
    if state is None or state.mesh is None or state.mesh.tp_size == 1:
        return type(self).generate(self, *args, **kwargs)
    group = state.mesh.tp_group
    arrive_together("generate", "call model.generate(...) on every rank of the tensor-parallel group (each computes "
                                "part of every token) with the same prompts, and print or keep the result on one",
                    group=group)
    with contextlib.ExitStack() as scope:
        scope.enter_context(install_input_checks(self, group).generate(args, kwargs))  # same prompts on the group
        rng.sync_from_tp_rank0(group)
        if state.sequence is not None:
            scope.enter_context(state.sequence.suspend())
        return type(self).generate(self, *args, **kwargs)


def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                            mean_resizing: bool = True):
    """`PreTrainedModel.resize_token_embeddings` for a split model. Every TP rank must call it.

    The vocabulary tensors are gathered whole on every rank for the duration (one embedding and one head in
    memory), resized by transformers itself, and split again; the plan and, with `loss_parallel`, the loss
    follow the new vocabulary.
    """
    state = tp_state(self)
    mesh = state.mesh
    embed, head = self.get_input_embeddings(), self.get_output_embeddings()
    if not isinstance(embed, VocabParallelEmbedding):
        raise TPSplitError(f"resize_token_embeddings: the input embedding is a {type(embed).__name__}, not "
                           f"tp_plugin's VocabParallelEmbedding")
    if new_num_tokens is None and pad_to_multiple_of is None:
        return embed
    group = mesh.tp_group
    arrive_together("resize_token_embeddings", "call model.resize_token_embeddings(...) on every rank", group=group)
    rng.sync_from_tp_rank0(group)  # the new rows are drawn from the RNG: the same rows on every rank
    tied = isinstance(head, VocabParallelLMHead) and head.weight is embed.weight
    # skip_init: building the stand-ins must not draw from the RNG that transformers then draws the new rows from
    full_embed = nn.utils.skip_init(nn.Embedding, embed.num_embeddings, embed.embedding_dim,
                                    device=embed.weight.device, dtype=embed.weight.dtype)
    full_embed.weight.data = gather_whole(embed.weight.data, embed.weight.tp_shard, group)
    full_embed.padding_idx = None if embed.padding_idx is None else embed.padding_idx + embed.vocab_start
    full_embed.weight.requires_grad_(embed.weight.requires_grad)
    self.set_input_embeddings(full_embed)
    if isinstance(head, VocabParallelLMHead):
        full_head = nn.utils.skip_init(nn.Linear, embed.embedding_dim, head.spec.full_size,
                                       bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype)
        full_head.weight = full_embed.weight if tied else nn.Parameter(
            gather_whole(head.weight.data, head.weight.tp_shard, group), requires_grad=head.weight.requires_grad)
        if head.bias is not None:
            full_head.bias.data = gather_whole(head.bias.data, head.bias.tp_shard, group)
        self.set_output_embeddings(full_head)
    result = type(self).resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)
    if tied:  # transformers ties again only when the config says so; keep the split model's tying
        self.get_output_embeddings().weight = self.get_input_embeddings().weight
    split_vocab(self, state, embed_scale=embed.embed_scale)
    return self.get_input_embeddings() if result is not None else None
