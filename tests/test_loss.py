"""The causal-LM loss of the default mode (full logits returned): the value of transformers' loss, a gradient
that never takes the full-vocabulary size, and nothing of that size kept for backward.

Tolerances as in test_parity (fp32, 1e-5: only the order of floating-point sums changes).
"""

from __future__ import annotations

import copy

import torch
import transformers

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, max_errors
from tp_plugin.runtime.loss import GatheredLogitsCausalLMLoss

VOCAB = 4001  # large next to the hidden size (72), so the logits dominate what a forward keeps; not a multiple of tp


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=72, intermediate_size=98, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, pad_token_id=0,
                                      tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _labels(ids):
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return labels


def _parity(rank, world):
    model = _model()
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=world)
    assert isinstance(model.loss_function, GatheredLogitsCausalLMLoss)
    ids = batch(seq=16)
    labels = _labels(ids)
    # num_items_in_batch as transformers' Trainer passes it under gradient accumulation: sum / count
    out = model(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    ref_out = ref(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    assert hasattr(out.logits, "tp_vocab_shard")
    (out.loss + 0.5 * out.logits[:, -1].square().mean()).backward()  # .logits stay differentiable too
    (ref_out.loss + 0.5 * ref_out.logits[:, -1].square().mean()).backward()
    return {"loss": (out.loss - ref_out.loss).abs().item(), "ref_loss": ref_out.loss.item(),
            "logits": (out.logits - ref_out.logits).abs().max().item(),
            "grads": max_errors(model, ref, model.tp_plugin_state.mesh.tp_group)}


def test_default_loss_matches_unsplit():
    for r in run_ranks(2, _parity):
        assert r["loss"] <= 1e-5 + 1e-5 * r["ref_loss"], r
        assert r["logits"] <= 1e-5, r
        name, worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst <= 2e-5, f"gradient of {name} differs by {worst:.2e}"


def _saved_bytes(model, ids, labels) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels).loss
    loss.backward()
    return sum(storages.values())


def _kept(rank, world):
    ids = batch(seq=32)
    labels = _labels(ids)
    result = {}
    for mode in ("default", "transformers_loss", "loss_parallel"):
        model = _model()
        tp_plugin.parallelize(model, tp_size=world, loss_parallel=mode == "loss_parallel")
        if mode == "transformers_loss":
            model.loss_function = model.loss_function.fallback  # the full-vocabulary loss this mode replaced
        result[mode] = _saved_bytes(model, ids, labels)
    return result


def test_default_loss_keeps_only_the_shard_for_backward():
    tokens, full_logits = 2 * 32, 2 * 32 * VOCAB * 4  # fp32
    for r in run_ranks(2, _kept):
        # transformers' loss keeps a full-vocabulary log-softmax; the default mode keeps the shard (half of it
        # at tp 2; the vocab-parallel loss keeps one too, as its softmax) and 3 numbers per token
        assert r["transformers_loss"] - r["default"] >= 0.99 * full_logits / 2, r
        assert abs(r["default"] - r["loss_parallel"]) <= 3 * 8 * tokens, r
