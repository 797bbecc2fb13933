"""State dicts and DDP wrappers of a split model: the habits of single-GPU and DDP scripts either work or fail
clearly, on the ranks they would make wrong, before anything is copied or averaged.

* the DDP habit, rank 0 saving `model.state_dict()` and every rank loading it, is refused on the other ranks
  (and at another degree on every rank); each rank loading its own state dict keeps working;
* a full unsplit state dict (`unsplit.state_dict()`) loads into the split model, sliced on the fly;
* `parallelize(DDP(model))`, `parallelize(ddp.module)` after wrapping and DDP over the world are refused.

Tolerance of the logits comparisons: split vs unsplit differ only in the order of fp32 sums, ~1e-6; 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build

ATOL = 1e-5


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _rank0_state_dict(rank, world, out, degree):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    target = model if degree == 2 else tp_plugin.parallelize(build("llama", 4), tp_size=4)
    try:
        target.load_state_dict(torch.load(out, weights_only=True))
    except tp_plugin.TPSplitError as exc:
        return str(exc)
    return None


def test_another_ranks_state_dict_is_refused(tmp_path):
    messages = run_ranks(2, _rank0_state_dict, str(tmp_path / "sd.pt"), 2)
    assert messages[0] is None, messages[0]  # rank 0's own shards: fine
    assert "got the state dict of TP rank 0 of 2" in messages[1] and "TP rank 1 of 2" in messages[1], messages[1]
    assert "tp_plugin.save_pretrained" in messages[1] and "save_sharded" in messages[1]


def test_another_degrees_state_dict_is_refused_on_every_rank(tmp_path):
    messages = run_ranks(4, _rank0_state_dict, str(tmp_path / "sd.pt"), 4)
    assert all(m and "got the state dict of TP rank 0 of 2" in m for m in messages), messages


def _own_state_dict_and_full_state_dict(rank, world, out, arch):
    ids = batch(seed=5)
    model = tp_plugin.parallelize(build(arch, 2), tp_size=2)
    torch.save(model.state_dict(), f"{out}.{rank}")
    other = tp_plugin.parallelize(build(arch, 2, seed=9), tp_size=2)  # other weights
    other.load_state_dict(torch.load(f"{out}.{rank}", weights_only=True))
    own = (_logits(other, ids) - _logits(model, ids)).abs().max().item()

    unsplit = build(arch, 2, seed=11)
    fresh = tp_plugin.parallelize(build(arch, 2), tp_size=2)
    fresh.load_state_dict(unsplit.state_dict())
    full = (_logits(fresh, ids) - _logits(unsplit, ids)).abs().max().item()
    return {"own": own, "full": full}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_own_and_full_state_dicts_load(tmp_path, arch):
    for r in run_ranks(2, _own_state_dict_and_full_state_dict, str(tmp_path / "sd"), arch):
        assert r["own"] == 0.0 and r["full"] <= ATOL, r


def _ddp(rank, world, how):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build("llama", 2)
    ids = batch(seed=6)
    try:
        if how == "parallelize_ddp":
            tp_plugin.parallelize(DDP(model), tp_size=2)
        elif how == "split_after_wrapping":
            ddp = DDP(model)
            tp_plugin.parallelize(ddp.module, tp_size=2)
            ddp(ids, labels=ids).loss.backward()
        else:  # DDP over the world around a split model whose shards have equal shapes (uneven ones: DDP's own
            # shape check refuses them), so DDP's start silently broadcasts rank 0's shards over rank 1's
            ddp = DDP(tp_plugin.parallelize(build("llama", 4), tp_size=2))
            ddp(ids, labels=ids).loss.backward()
    except tp_plugin.TPSplitError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("how,says", [("parallelize_ddp", "split the model before wrapping"),
                                      ("split_after_wrapping", "wrapped the model before tp_plugin.parallelize"),
                                      ("ddp_over_the_world", "include ranks [0, 1] of one tensor-parallel group")])
def test_ddp_wrapped_models_are_refused_with_the_fix(how, says):
    for message in run_ranks(2, _ddp, how):
        assert message and says in message and "dp_group" in message, message
