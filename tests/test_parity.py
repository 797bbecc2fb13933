"""Split vs. unsplit: logits, loss and every parameter's gradient, for every registered architecture.

Tolerances (fp32): the split changes only the order of floating-point sums (a row-parallel matmul adds
partial sums from each rank; the vocab-parallel softmax adds per-rank exp sums), so results differ by a few
ulps of values of order 1-10. We allow 1e-5 absolute + 1e-5 relative: 100x the fp32 epsilon, far below
what any mis-sliced head, bias or missing all-reduce produces (those give errors of order 0.1-1, which the
`test_parity_detects_a_wrong_split` test shows).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import tp_plugin
from tests.dist import run_ranks
from tests.models import ARCHS, batch, build, max_errors

ATOL = RTOL = 1e-5


def _parity(rank, world, arch, tp, head, tied, loss_parallel, sequence_parallel=False, seq=12):
    model = build(arch, tp, head=head, tied=tied)  # in training mode (dropout 0), as from_config leaves it
    ref = copy.deepcopy(model)
    ids = batch(seq=seq)
    labels = torch.tensor([0, 2]) if head == "seq_cls" else ids
    tp_plugin.parallelize(model, tp_size=tp, loss_parallel=loss_parallel, sequence_parallel=sequence_parallel)
    group = model.tp_plugin_state.mesh.tp_group
    out, ref_out = model(ids, labels=labels), ref(ids, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    sequence = model.tp_plugin_state.sequence
    result = {"loss": (out.loss - ref_out.loss).abs().item(), "grads": max_errors(model, ref, group),
              "ref_loss": ref_out.loss.item(), "sequence_parallel": sequence is not None and sequence.active()}
    if not loss_parallel:
        assert out.logits.shape == ref_out.logits.shape, (out.logits.shape, ref_out.logits.shape)
        result["logits"] = (out.logits - ref_out.logits).abs().max().item()
        result["logits_scale"] = ref_out.logits.abs().max().item()
    return result


def _assert_close(results, *, scale_key="logits_scale"):
    for r in results:
        assert r["loss"] <= ATOL + RTOL * abs(r["ref_loss"]), r["loss"]
        if "logits" in r:
            assert r["logits"] <= ATOL + RTOL * r[scale_key], r["logits"]
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 2 * ATOL, f"gradient of {worst[0]} differs by {worst[1]:.2e}"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_causal_lm_parity(arch, tp):
    if arch not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:  # make test-versions: older
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")  # releases lack newer families
    _assert_close(run_ranks(tp, _parity, arch, tp, "causal_lm", True, False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_untied_and_loss_parallel(arch):
    _assert_close(run_ranks(2, _parity, arch, 2, "causal_lm", False, True))
    _assert_close(run_ranks(4, _parity, arch, 4, "causal_lm", True, True))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sequence_classification_parity(arch):
    _assert_close(run_ranks(2, _parity, arch, 2, "seq_cls", True, False))


def _training(rank, world, arch, tp, loss_parallel, steps=5):
    model = build(arch, tp)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp, loss_parallel=loss_parallel)
    losses = []
    for m in (model, ref):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        track = []
        for step in range(steps):
            ids = batch(seed=0)  # one batch, memorised: the loss must fall
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            track.append(loss.item())
        losses.append(track)
    return losses


@pytest.mark.parametrize("arch,tp,loss_parallel", [("llama", 2, False), ("llama", 4, True), ("gpt2", 2, True)])
def test_five_optimizer_steps_track_unsplit(arch, tp, loss_parallel):
    for split, ref in run_ranks(tp, _training, arch, tp, loss_parallel):
        assert ref[-1] < ref[0] - 0.1, f"the reference run did not learn: {ref}"  # the test can see drift
        # Adam normalises updates, so sum-order noise (1e-7) stays at that size over 5 steps.
        assert split == pytest.approx(ref, abs=1e-4), (split, ref)


def _dp_tp(rank, world):
    """tp=2 x dp=2: each TP group is split independently and the DP replicas stay identical."""
    model = build("llama", 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2)
    mesh = model.tp_plugin_state.mesh
    ids = batch(seed=10 + mesh.dp_rank)  # different data per DP replica, same within a TP group
    out, ref_out = model(ids, labels=ids), ref(ids, labels=ids)
    return {"tp_rank": mesh.tp_rank, "dp_rank": mesh.dp_rank, "err": (out.logits - ref_out.logits).abs().max().item()}


def test_dp_by_tp_layout_is_tp_innermost():
    results = run_ranks(4, _dp_tp)
    assert [(r["dp_rank"], r["tp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert max(r["err"] for r in results) < 1e-4


def _wrong_split(rank, world):
    """Swap two heads' rows of q_proj on rank 0: parity must catch it (the tolerances are not too loose)."""
    model = build("llama", 2)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2)
    if rank == 0:
        with torch.no_grad():
            w = model.model.layers[0].self_attn.q_proj.weight
            w[:8], w[8:16] = w[8:16].clone(), w[:8].clone()
    ids = batch()
    return (model(ids).logits - ref(ids).logits).abs().max().item()


def test_parity_detects_a_wrong_split():
    assert min(run_ranks(2, _wrong_split)) > 1e-3


def _different_seeds(rank, world):
    """Each rank builds a different random model: the split model must be TP rank 0's, on every rank."""
    model = build("llama", 2, seed=100 + rank)
    ref = build("llama", 2, seed=100)
    tp_plugin.parallelize(model, tp_size=2)
    norm = model.model.norm.weight.detach().clone()
    ids = batch()
    return (model(ids).logits - ref(ids).logits).abs().max().item(), norm


def test_weights_are_taken_from_tp_rank0_when_ranks_differ():
    (err0, norm0), (err1, norm1) = run_ranks(2, _different_seeds)
    assert max(err0, err1) < 1e-4
    assert torch.equal(norm0, norm1)  # replicated parameters bit-identical across the TP group
