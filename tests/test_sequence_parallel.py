"""Sequence parallelism: the split model with `sequence_parallel=True` against the unsplit model.

Tolerances are test_parity's (fp32, 1e-5): sequence parallelism changes which rank sums which rows, never what
is computed, so the results differ by a few ulps; a wrong scatter, a missing gradient sum of a norm weight or
a padding token leaking into attention gives errors of order 0.1-1.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, max_errors
from tests.test_parity import _assert_close


def _parity(rank, world, arch, tp, seq, loss_parallel):
    model = build(arch, tp)
    ref = copy.deepcopy(model)
    ids = batch(seq=seq)
    tp_plugin.parallelize(model, tp_size=tp, sequence_parallel=True, loss_parallel=loss_parallel)
    group = model.tp_plugin_state.mesh.tp_group
    model.train(), ref.train()
    out, ref_out = model(ids, labels=ids), ref(ids, labels=ids)
    out.loss.backward()
    ref_out.loss.backward()
    result = {"loss": (out.loss - ref_out.loss).abs().item(), "grads": max_errors(model, ref, group),
              "ref_loss": ref_out.loss.item()}
    if not loss_parallel:
        assert out.logits.shape == ref_out.logits.shape, (out.logits.shape, ref_out.logits.shape)
        result["logits"] = (out.logits - ref_out.logits).abs().max().item()
        result["logits_scale"] = ref_out.logits.abs().max().item()
    return result


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_parity(arch, tp):
    # seq 12 divides by 2 and 4; 13 does not (padded at the end, stripped from every output)
    _assert_close(run_ranks(tp, _parity, arch, tp, 12, False))
    _assert_close(run_ranks(tp, _parity, arch, tp, 13, False))
