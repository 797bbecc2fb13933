"""A caller's own device mesh: a 3-D (pp, dp, tp) mesh passed to `parallelize(mesh=...)` is used as given (its
TP and DP groups, a batch per data-parallel replica matching the unsplit model), and a model built on the meta
device splits on it without materialising (each collective and its dual on the groups: test_comm.py).

Tolerance for the mesh parity: the same split as `test_parity` (fp32, 1e-5), only the mesh is the caller's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build


def _with_mesh(rank, world, meta):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
    ref = build("llama", 2)
    if meta:
        with torch.device("meta"):
            model = type(ref)(ref.config)
        tp_plugin.parallelize(model, mesh=mesh)
        state = tp_plugin.tp_state(model)
        return (state.mesh.tp_size, state.mesh.dp_size, tuple(model.model.layers[0].self_attn.q_proj.weight.shape),
                model.model.layers[0].self_attn.q_proj.weight.is_meta)
    model = tp_plugin.parallelize(build("llama", 2), mesh=mesh)
    state = tp_plugin.tp_state(model)
    ids = batch(seed=10 + state.mesh.dp_rank)  # a batch per data-parallel replica
    err = (model(ids).logits - ref(ids).logits).abs().max().item()
    tp_ranks = dist.get_process_group_ranks(state.mesh.tp_group)
    dp_ranks = dist.get_process_group_ranks(state.mesh.dp_group)
    return state.mesh.tp_size, state.mesh.dp_size, tp_ranks, dp_ranks, err


def test_a_callers_3d_mesh_is_used_as_given():
    results = run_ranks(4, _with_mesh, False)
    for rank, (tp, dp, tp_ranks, dp_ranks, err) in enumerate(results):
        assert (tp, dp) == (2, 2) and err <= 1e-5, (tp, dp, err)
        assert tp_ranks == [rank - rank % 2, rank - rank % 2 + 1] and dp_ranks == [rank % 2, rank % 2 + 2]


def test_a_meta_model_splits_on_a_callers_mesh():
    for tp, dp, shape, is_meta in run_ranks(4, _with_mesh, True):
        assert (tp, dp) == (2, 2) and is_meta
        assert shape[0] in (6 * 8, 3 * 8)  # 9 heads / 3 KV heads of width 8: an uneven 6 + 3 split
