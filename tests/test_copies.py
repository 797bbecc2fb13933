"""`copy.deepcopy` of a split model (EMA, AveragedModel, frozen reference copies) and of one split layer.

A copy must be an independent split model on the same process groups: the same logits as the original, its own
parameters (training the copy leaves the original alone), the TP tags and gradient hooks on its parameters (its
gradients equal the unsplit model's, sequence parallelism's partial sums included), its own sequence-parallel
state and input checks, and the LM head weight finding the copy's head (TRL's fused head reads it).

Tolerances: split and unsplit differ only in the order of fp32 sums, ~1e-6 on logits and gradients of order 1;
we allow 1e-5 (a lost gradient sum is off by the gradient itself, ~1e-2 and more). A copy and its original run
the same shards through the same code: their logits are equal bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, full_param, max_errors

ATOL = 1e-5


def _copy_trains_like_the_unsplit_model(rank, world, arch, sequence_parallel):
    ref = build(arch, 2)
    model = tp_plugin.parallelize(build(arch, 2), tp_size=2, sequence_parallel=sequence_parallel)
    state = tp_plugin.tp_state(model)
    twin = copy.deepcopy(model)
    twin_state = tp_plugin.tp_state(twin)
    assert twin_state.mesh is state.mesh and twin_state.plan is not state.plan
    if sequence_parallel:
        assert twin_state.sequence is not None and twin_state.sequence is not state.sequence
        assert twin_state.sequence._base() is twin.base_model
    assert twin.tp_plugin_input_checks is not model.tp_plugin_input_checks
    head = twin.get_output_embeddings()
    assert head.weight.tp_vocab_head() is head  # the copy's head, not the original's
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert q is not p and getattr(q, "tp_shard", None) == getattr(p, "tp_shard", None), name
        assert len(getattr(q, "tp_grad_hooks", ())) == len(getattr(p, "tp_grad_hooks", ())), name

    ids = batch(seed=3, seq=11)  # 11 tokens: sequence parallelism pads them to 12
    model.eval(), twin.eval()
    with torch.no_grad():
        same = torch.equal(model(ids).logits, twin(ids).logits)
    twin.train(), ref.train()
    twin(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    grad_err = max(max_errors(twin, ref, state.mesh.tp_group).values())
    assert all(p.grad is None for p in model.parameters())  # the original saw none of it
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    moved = max((a - b).abs().max().item() for a, b in zip(twin.parameters(), model.parameters()))
    before = {n: full_param(p, state.mesh.tp_group) for n, p in model.named_parameters()}
    unchanged = all(torch.equal(before[n], full_param(p, state.mesh.tp_group)) for n, p in model.named_parameters())
    return {"same": same, "grad_err": grad_err, "moved": moved, "unchanged": unchanged}


@pytest.mark.parametrize("arch,sequence_parallel", [("llama", False), ("gpt2", False), ("gpt2", True)])
def test_a_deep_copy_is_an_independent_split_model(arch, sequence_parallel):
    for r in run_ranks(2, _copy_trains_like_the_unsplit_model, arch, sequence_parallel):
        assert r["same"] and r["unchanged"] and r["moved"] > 0, r
        assert r["grad_err"] <= ATOL, r


def _averaged_model(rank, world, split):
    """torch's AveragedModel with an EMA, updated after each of 3 AdamW steps, then evaluated."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = build("llama", 2)
    if split:
        tp_plugin.parallelize(model, tp_size=2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        ids = batch(seed=10 + step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
    ema.eval()
    with torch.no_grad():
        return ema(batch(seed=20)).logits


def test_averaged_model_ema_matches_the_unsplit_one():
    ref = run_ranks(1, _averaged_model, False)[0]
    for logits in run_ranks(2, _averaged_model, True):
        assert (logits - ref).abs().max().item() <= ATOL


def _copy_one_layer(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    layer = model.model.layers[0].self_attn.o_proj
    head = model.get_output_embeddings()
    twin, head_twin = copy.deepcopy(layer), copy.deepcopy(head)
    x = torch.randn(2, 5, layer.weight.shape[1])
    h = torch.randn(2, 5, head.weight.shape[1])
    return {"group": twin.group is layer.group, "weight": twin.weight is not layer.weight,
            "tags": twin.weight.tp_shard == layer.weight.tp_shard, "same": torch.equal(twin(x), layer(x)),
            "head": head_twin.weight.tp_vocab_head() is head_twin and torch.equal(head_twin(h), head(h))}


def test_a_deep_copy_of_one_split_layer_stays_on_its_group():
    for r in run_ranks(2, _copy_one_layer):
        assert all(r.values()), r
