"""`tp_plugin.clip_grad_norm_` on a split model = `torch.nn.utils.clip_grad_norm_` on the unsplit one.

tp=2 splits 9 heads / 3 KV heads unevenly; tp=4 replicates each of 2 KV heads on 2 ranks (`tp_replicas`=2),
whose rows must be counted once. Tolerance: the norm is a sum of squares in a different order (per rank,
then all-reduced): relative 1e-6 (fp32 epsilon is 1.2e-7); gradients after clipping as in test_parity.py.
Counting a replicated parameter or a replicated KV head twice changes the norm by several percent.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build, max_errors


def _clip(rank, world, arch, tp, max_norm, norm_type):
    model = build(arch, tp)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=tp)
    ids = batch()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    norm = tp_plugin.clip_grad_norm_(model, max_norm, norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    return norm.item(), ref_norm.item(), max(max_errors(model, ref, model.tp_plugin_state.mesh.tp_group).values())


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama", 4), ("gpt2", 2)])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_unsplit(arch, tp, norm_type):
    for norm, ref_norm, grad_err in run_ranks(tp, _clip, arch, tp, 0.1, norm_type):
        assert ref_norm > 0.1  # the clipping bites, so the scaled gradients are compared too
        assert norm == pytest.approx(ref_norm, rel=1e-6), (norm, ref_norm)
        assert grad_err <= 2e-5, grad_err
