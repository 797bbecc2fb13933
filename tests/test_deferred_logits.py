"""The contract of a training forward's `.logits` (`tp_plugin.runtime.logits`): computed only when read, and then
the unsplit model's; metadata for free; a read the split model cannot honour is a clear error, not a hang or a
stale number. The clients that read them (a loop's own loss and accuracy, `generate` on a model left in training
mode; the Trainer's label smoothing is in test_trainer) get the unsplit model's numbers.

Tolerances as in test_parity (fp32, 1e-5).
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn.functional as F

import tp_plugin
from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks
from tests.models import batch, build, max_errors
from tp_plugin.runtime.logits import DeferredLogits
from tp_plugin.sharding import TPSplitError


def _metadata(rank, world):
    model = build("llama", world)
    tp_plugin.parallelize(model, tp_size=world)
    ids = batch()
    model(ids)  # the first training forward's input check, out of the count
    with CollectiveCounter() as counter:
        out = model(ids)
        logits = out.logits
        facts = (tuple(logits.shape), logits.dtype, logits.device.type, logits.size(-1), logits.dim(),
                 logits.requires_grad, logits.is_floating_point(), logits.numel())
    return {"facts": facts, "computed": logits._value is not None, "counts": dict(counter.counts),
            "type": type(logits).__name__}


def test_metadata_reads_compute_nothing():
    for r in run_ranks(2, _metadata):
        assert r["type"] == "DeferredLogits"
        assert r["facts"] == ((2, 12, 101), torch.float32, "cpu", 101, 3, True, True, 2 * 12 * 101), r
        assert not r["computed"]
        # the body's collectives only (embedding, 2 per block): no all-gather of logits nobody read
        assert r["counts"] == {"all_reduce": 1 + 2 * 2}, r


def _own_loss_and_accuracy(rank, world):
    model, ref = build("llama", world), build("llama", world)
    tp_plugin.parallelize(model, tp_size=world)
    ids = batch()
    losses, accuracies = [], []
    for m in (model, ref):
        logits = m(ids).logits  # a plain loop's own loss and metric, from the logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.item())
        accuracies.append((logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item())
    return {"loss": abs(losses[0] - losses[1]), "accuracy": accuracies,
            "grads": max_errors(model, ref, model.tp_plugin_state.mesh.tp_group)}


def test_a_loop_that_reads_the_logits_gets_the_unsplit_numbers():
    for r in run_ranks(2, _own_loss_and_accuracy):
        assert r["loss"] <= 1e-5, r
        assert r["accuracy"][0] == r["accuracy"][1], r
        assert max(r["grads"].values()) <= 2e-5, r


def _one_rank_reads(rank, world):
    os.environ["TP_PLUGIN_ARRIVAL_TIMEOUT"] = "3"  # the ranks are forked from a server started earlier
    model = build("llama", world)
    tp_plugin.parallelize(model, tp_size=world)
    out = model(batch())
    start = time.monotonic()
    try:
        if rank == 0:
            print(out.logits)
        outcome = "read"
    except TPSplitError as exc:
        outcome = str(exc)
    return {"outcome": outcome, "seconds": time.monotonic() - start}


def test_a_read_on_one_rank_is_an_error_not_a_hang():
    lone, other = run_ranks(2, _one_rank_reads)
    assert "every rank of tensor-parallel group [0, 1]" in lone["outcome"], lone
    assert "out.logits" in lone["outcome"] and lone["seconds"] < 30, lone
    assert other["outcome"] == "read", other  # the rank that did not read goes on


def _after_step(rank, world):
    results = {}
    for defer in (True, False):
        model, ref = build("llama", world), build("llama", world)
        tp_plugin.parallelize(model, tp_size=world)
        model.get_output_embeddings().defer_logits = defer
        ids = batch()
        for m in (model, ref):
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            out = m(ids, labels=ids)
            out.loss.backward()
            opt.step()
            try:
                results[(defer, m is ref)] = out.logits.argmax(-1).tolist()
            except TPSplitError as exc:
                results[(defer, m is ref)] = str(exc)
    return {"deferred_error": results[(True, False)], "eager": results[(False, False)] == results[(False, True)]}


def test_a_read_after_the_optimizer_step_is_an_error_unless_logits_are_eager():
    for r in run_ranks(2, _after_step):
        assert "after the LM head's weight" in r["deferred_error"] and "defer_logits = False" in r["deferred_error"]
        assert r["eager"], r


def _generate_in_training_mode(rank, world):
    model, ref = build("llama", world), build("llama", world)
    tp_plugin.parallelize(model, tp_size=world)
    ids = batch(batch_size=1, seq=5)
    with torch.no_grad():  # both left in training mode (no dropout in these models)
        return (model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist(),
                ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist())


def test_generate_on_a_model_in_training_mode_matches_unsplit():
    for out, ref in run_ranks(2, _generate_in_training_mode):
        assert out == ref


def _copies(rank, world):
    model = build("llama", world)
    tp_plugin.parallelize(model, tp_size=world)
    with torch.no_grad():  # as unsplit, only logits that need no gradient can be deep-copied
        out = model(batch())
    kept = copy.deepcopy(out.logits)  # a copy of the outputs is a copy of the values
    return type(kept).__name__, isinstance(out.logits, DeferredLogits), kept.shape == out.logits.shape


def test_a_copy_of_the_logits_is_a_plain_tensor():
    for name, deferred, same_shape in run_ranks(2, _copies):
        assert name == "Tensor" and deferred and same_shape
