"""The run-time pieces on a hand-built block, without a model or a plan: `runtime.layers` (column and row
parallel linears), `runtime.regions` (one region whose column layers share one input-gradient reduction),
`runtime.overlap` (that reduction overlapped or not: the same numbers), `runtime.rng` (the per-rank stream).

The block: y = o(relu(q(x)) * k(x)) with q, k split by output rows and o by input columns over 2 ranks. Against
the unsplit block (fp32): outputs and every gradient within 1e-6 (sums of 2 values of order 1 in another order).
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.dist import run_ranks

TOL = 1e-6


class Block(nn.Module):
    def __init__(self, q, k, o):
        super().__init__()
        self.q, self.k, self.o = q, k, o

    def forward(self, hidden_states):
        return self.o(torch.relu(self.q(hidden_states)) * self.k(hidden_states))


def _reference():
    torch.manual_seed(0)
    return Block(nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6))


def _block_rank(rank, world, overlap):
    from tp_plugin.runtime.layers import ColumnParallelLinear, RowParallelLinear
    from tp_plugin.runtime.regions import install_region
    from tp_plugin.sharding import ShardSpec
    from tp_plugin.testing.collectives import CollectiveCounter

    group = dist.group.WORLD
    ref = _reference()
    rows = ShardSpec(0, 8, ((4 * rank, 4 * rank + 4),))
    cols = ShardSpec(1, 8, ((4 * rank, 4 * rank + 4),))
    split = Block(ColumnParallelLinear(ref.q.weight, ref.q.bias, rows, group, sync_input_grad=False),
                  ColumnParallelLinear(ref.k.weight, ref.k.bias, rows, group, sync_input_grad=False),
                  RowParallelLinear(ref.o.weight, ref.o.bias, cols, group))
    region = install_region(split, group, None, None, overlap=overlap)
    for layer in (split.q, split.k):
        layer.region = weakref.ref(region)
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    x_ref, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref).square().sum().backward()
    with CollectiveCounter() as fwd:
        out = split(x_split)
    with CollectiveCounter() as bwd:
        out.square().sum().backward()
    errors = {"out": (out - ref(x_ref)).abs().max().item(), "x.grad": (x_split.grad - x_ref.grad).abs().max().item()}
    for name in ("q", "k"):
        want = getattr(ref, name).weight.grad[4 * rank:4 * rank + 4]
        errors[f"{name}.weight.grad"] = (getattr(split, name).weight.grad - want).abs().max().item()
    errors["o.weight.grad"] = (split.o.weight.grad - ref.o.weight.grad[:, 4 * rank:4 * rank + 4]).abs().max().item()
    return {"errors": errors, "fwd": dict(fwd.counts), "bwd": dict(bwd.counts), "calls_left": len(region.calls)}


@pytest.mark.parametrize("overlap", [True, False])
def test_a_region_reduces_its_column_layers_input_gradient_once(overlap):
    """q and k read the region's input through one face: one all-reduce of the input gradient in backward (not
    one per layer), one of the row layer's output in forward; the call stack is empty after the call."""
    for r in run_ranks(2, _block_rank, overlap):
        assert max(r["errors"].values()) <= TOL, r["errors"]
        assert r["fwd"] == {"all_reduce": 1} and r["bwd"] == {"all_reduce": 1}, (r["fwd"], r["bwd"])
        assert r["calls_left"] == 0


def _streams_rank(rank, world):
    from tp_plugin.runtime.rng import RankStreams

    def run():
        torch.manual_seed(7)  # the same seed on every rank: the replicated stream
        streams = RankStreams(rank)
        before = torch.rand(3)
        streams.enter("region")
        inside = torch.rand(3)
        streams.enter("region")  # nested entry: already on the per-rank stream
        streams.leave("other")  # only the tag that entered leaves
        still = torch.rand(3)
        streams.leave("region")
        after = torch.rand(3)
        return before, inside, still, after

    first, again = run(), run()
    gathered = [None] * world
    dist.all_gather_object(gathered, first)
    return {"everyone": gathered, "repeatable": all(torch.equal(a, b) for a, b in zip(first, again))}


def test_rank_streams_differ_inside_a_region_and_agree_outside():
    """Inside a region each TP rank draws its own numbers (dropout on its own heads); before and after, every
    rank draws the same (dropout on replicated activations); a seeded run repeats exactly."""
    results = run_ranks(2, _streams_rank)
    (before0, inside0, still0, after0), (before1, inside1, still1, after1) = results[0]["everyone"]
    assert torch.equal(before0, before1) and torch.equal(after0, after1)
    assert not torch.equal(inside0, inside1) and not torch.equal(still0, still1)
    assert all(r["repeatable"] for r in results)
