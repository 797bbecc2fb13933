"""The foundation's contracts: importing changes nothing, every patch is listed and reversible, a caller's mesh
is used as given (each collective and its dual: test_comm.py).

Tolerance for the mesh parity: the same split as `test_parity` (fp32, 1e-5), only the mesh is the caller's.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_under_accelerate_launch_has_no_side_effect():
    probe = ("import accelerate, sys, torch.distributed as d; p = accelerate.Accelerator.prepare; import tp_plugin\n"
             "print(d.is_initialized(), accelerate.Accelerator.prepare is p, "
             "any(type(f).__name__ == 'RunAfterImport' for f in sys.meta_path))")
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599",
               ACCELERATE_MIXED_PRECISION="no", PARALLELISM_CONFIG_TP_SIZE="2",
               ACCELERATE_USE_PARALLELISM_CONFIG="true")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "False"], out.stdout  # no group, unpatched, no import hook


def _patches(rank, world):
    import accelerate
    import peft
    import peft.utils.save_and_load
    import trl.trainer.utils

    def snapshot():
        return (accelerate.Accelerator.prepare, accelerate.Accelerator.clip_grad_norm_, peft.PeftModel.save_pretrained,
                peft.tuners.tuners_utils.BaseTuner.inject_adapter, peft.utils.save_and_load.get_peft_model_state_dict,
                trl.trainer.utils._ChunkedLogProbFunction)

    from tp_plugin.integrations import patching

    tp_plugin.integrations.uninstall()  # the harness's earlier tests may have split models in this process
    before = snapshot()
    tp_plugin.parallelize(build("llama", 2), tp_size=2)
    during, listed = snapshot(), patching.active()
    tp_plugin.integrations.uninstall()
    after, left = snapshot(), patching.active()
    os.environ["TP_PLUGIN_PATCHES"] = "none"
    try:
        tp_plugin.parallelize(build("llama", 2), tp_size=2)
        off = snapshot()
    finally:
        del os.environ["TP_PLUGIN_PATCHES"]
    return [a is b for a, b in zip(before, during)], after == before, off == before, listed, left


def test_every_patch_is_installed_by_the_split_and_undone_by_uninstall():
    for changed, restored, off, listed, left in run_ranks(2, _patches):
        assert not any(changed), changed  # all six replaced while a split model exists
        assert restored and off
        # the one patch helper lists them (Accelerate's five functions in `accelerate.accelerator` among them)
        assert {"accelerate.accelerator.Accelerator.prepare", "peft.peft_model.PeftModel.save_pretrained",
                "trl.trainer.utils._ChunkedLogProbFunction"} <= set(listed) and not left, (listed, left)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU check)")
def test_cuda_rng_state_is_synchronised():
    def _rank(rank, world):
        torch.cuda.manual_seed(rank)
        torch.cuda.init()
        from tp_plugin.runtime import rng

        rng.sync_from_tp_rank0(dist.group.WORLD)
        return torch.rand(4, device="cuda").cpu()

    a, b = run_ranks(2, _rank)
    assert torch.equal(a, b)
