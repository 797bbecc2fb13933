"""The causal-LM loss of a split model: computed from the hidden states and the head's shard (the logits stay
deferred), with the value and every gradient of transformers' loss on the unsplit model, in the default mode and
with `loss_parallel`, through the transforms models apply between head and loss (Gemma 2's soft-capping, Cohere's
and Granite's scaling); and nothing of the vocabulary's size kept for backward.

Tolerances as in test_parity (fp32, 1e-5: only the order of floating-point sums changes).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, max_errors
from tp_plugin.runtime.logits import DeferredLogits
from tp_plugin.runtime.loss import CausalLMLoss

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


# transforms strong enough to matter at these logits' size (|z| ~ 0.1-1): tanh(z / 30) * 30 would be z to 1e-5
TRANSFORMS = {"gemma2": {"final_logit_softcapping": 0.1}, "granite": {"logits_scaling": 4.0}}


def _parity(rank, world, arch, loss_parallel):
    model = _model() if arch == "llama-4001" else build(arch, world)
    for key, value in TRANSFORMS.get(arch, {}).items():
        setattr(model.config, key, value)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=world, loss_parallel=loss_parallel)
    assert isinstance(model.loss_function, CausalLMLoss)
    ids = batch(seq=16) % model.config.vocab_size
    labels = _labels(ids)
    # num_items_in_batch as transformers' Trainer passes it under gradient accumulation: sum / count
    out = model(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    ref_out = ref(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    deferred = isinstance(out.logits, DeferredLogits) and out.logits._value is None
    loss_error = (out.loss - ref_out.loss).abs().item()
    out.loss.backward()
    ref_out.loss.backward()
    head = model.get_output_embeddings()
    ref_logits = ref_out.logits[..., head.vocab_start:head.vocab_stop] if loss_parallel else ref_out.logits
    logits = out.logits[..., : ref_logits.shape[-1]]  # read after backward: computed now (a shard's padding cut)
    return {"deferred": deferred, "loss": loss_error, "ref_loss": ref_out.loss.item(),
            "logits": (logits - ref_logits).abs().max().item(),
            "grads": max_errors(model, ref, model.tp_plugin_state.mesh.tp_group)}


@pytest.mark.parametrize("arch,loss_parallel", [("llama-4001", False), ("llama-4001", True), ("gemma2", False),
                                                ("cohere", False), ("granite", True)])
def test_loss_matches_unsplit(arch, loss_parallel):
    # gemma2: soft-capped logits; cohere: multiplied by logit_scale; granite: divided by logits_scaling; each
    # recorded on the deferred logits and applied by the fused loss to each chunk
    for r in run_ranks(2, _parity, arch, loss_parallel):
        assert r["deferred"], "the loss of a training forward built the logits"
        assert r["loss"] <= 1e-5 + 1e-5 * r["ref_loss"], r
        assert r["logits"] <= 1e-5, r
        name, worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst <= 2e-5, f"gradient of {name} differs by {worst:.2e}"


def _saved_bytes(step) -> int:
    """Bytes of the tensors autograd keeps for backward during `step()`'s forward (each storage counted once,
    parameters included)."""
    storages, kept = {}, []  # kept alive until counted: a freed storage could lend its address to another

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
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
            model.loss_function = model.loss_function.fallback  # reads the logits: they are computed, gathered
        result[mode] = _saved_bytes(lambda: model(ids, labels=labels).loss)
        if mode == "default":  # the body alone: what the model keeps before its head
            result["body"] = _saved_bytes(lambda: model.model(ids).last_hidden_state.sum())
            result["head_shard"] = model.lm_head.weight.numel() * 4
    return result


def test_loss_keeps_nothing_of_the_vocabulary_size_for_backward():
    tokens = 2 * 32
    full_logits = tokens * VOCAB * 4  # fp32
    for r in run_ranks(2, _kept):
        # transformers' loss keeps a full-vocabulary log-softmax; the fused loss keeps the hidden states (which
        # the head's matmul would keep anyway) and a few numbers per token, in both modes
        assert r["transformers_loss"] - r["default"] >= 0.99 * full_logits, r
        assert r["default"] == r["loss_parallel"], r
        # beyond the body: the head's weight shard, its input [tokens, 72] and 4 numbers per token (log-sum-exp,
        # target, its mask, the loss's mask)
        assert r["default"] - r["body"] <= r["head_shard"] + tokens * 72 * 4 + tokens * 4 * 8, r
