"""`tp_plugin.runtime.comm` on its own: every autograd collective gives the expected value, its backward is its
dual, and each direction issues exactly the collectives its docstring names (counted, 2 gloo ranks).

Duality is checked as the adjoint identity of the op as a map of the group's tensors, with Megatron's reading of
them: a replicated tensor (the same on every rank) is one variable, counted once; a per-rank tensor (a shard, or a
partial sum) is one variable per rank. With L = <op(x), g> (the output gradient g replicated or per-rank as the
op's consumers make it), backward must give dL/dx, so <op(x), g> == <x, backward(g)> in those inner products, and
the input gradient of a replicated input must be the same on every rank. A wrong dual (an all-reduce where a
slice belongs, a missing reduction) breaks the identity by O(1). Sums of 2 fp32 values: 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks

TOL = 1e-5

# op name -> (input shape per rank, forward collectives, backward collectives, input kind, output-gradient kind)
OPS = {
    "copy_to_tp": ((3, 4), {}, {"all_reduce": 1}, "replicated", "per-rank"),
    "reduce_from_tp": ((3, 4), {"all_reduce": 1}, {}, "per-rank", "replicated"),
    "gather_from_tp": ((3, 4), {"all_gather": 1}, {}, "per-rank", "replicated"),
    "gather_along": ((3, 4, 5), {"all_gather": 1}, {"reduce_scatter": 1}, "per-rank", "per-rank"),
    "gather_along_replicated": ((3, 4, 5), {"all_gather": 1}, {}, "per-rank", "replicated"),
    "split_along": ((3, 8, 5), {}, {"all_gather": 1}, "replicated", "per-rank"),
    "reduce_scatter_along": ((3, 8, 5), {"reduce_scatter": 1}, {"all_gather": 1}, "per-rank", "per-rank"),
    "all_reduce_both_ways": ((3, 4), {"all_reduce": 1}, {"all_reduce": 1}, "per-rank", "per-rank"),
    "sum_grad_over_sharers": ((2, 4), {}, {"all_reduce": 1}, "per-rank", "per-rank"),
}


def _apply(name, x, group):
    from tp_plugin.runtime import comm

    if name == "gather_along":
        return comm.gather_along(x, 1, group)
    if name == "gather_along_replicated":
        return comm.gather_along(x, 1, group, grad_is_partial=False)
    if name in ("split_along", "reduce_scatter_along"):
        return getattr(comm, name)(x, 1, group)
    if name == "sum_grad_over_sharers":  # rank r holds rows [r, r + 2) of 3: row 1 on both ranks
        return comm.sum_grad_over_sharers(x, group, [(dist.get_rank(group), dist.get_rank(group) + 2)], 3)
    return getattr(comm, name)(x, group)


def _op_rank(rank, world, name):
    from tp_plugin.runtime import comm
    from tp_plugin.testing.collectives import CollectiveCounter

    comm.GLOO_REDUCE_SCATTER_BY_ALL_REDUCE = False  # count the real reduce-scatter
    group = dist.group.WORLD
    shape, _, _, x_kind, g_kind = OPS[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0 if x_kind == "replicated" else rank))
    x.requires_grad_()
    with CollectiveCounter() as fwd:
        out = _apply(name, x * 1.0, group)  # (* 1.0: a fresh non-leaf, as in a model; in-place ops may reduce it)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 if g_kind == "replicated" else 100 + rank))
    with CollectiveCounter() as bwd:
        out.backward(g)

    def inner(a, b, kind):  # a replicated pair counts once, per-rank pairs are summed over the group
        total = (a.detach() * b).sum().reshape(1)
        dist.all_reduce(total)
        return total.item() / (world if kind == "replicated" else 1)

    return {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts), "out": out.detach(), "x": x.detach(),
            "grad": x.grad, "g": g, "sides": [inner(out, g, g_kind), inner(x, x.grad, x_kind)]}


@pytest.mark.parametrize("name", list(OPS))
def test_each_collective_has_its_dual_and_its_counted_cost(name):
    results = run_ranks(2, _op_rank, name)
    _, want_fwd, want_bwd, x_kind, _ = OPS[name]
    for r in results:
        assert r["fwd"] == want_fwd and r["bwd"] == want_bwd, (name, r["fwd"], r["bwd"])
    if name == "sum_grad_over_sharers":  # rows overlap: the shared row's gradient is the sum of its holders'
        full = torch.zeros(3, 4)
        for rank, r in enumerate(results):
            full[rank:rank + 2] += r["g"]
        for rank, r in enumerate(results):
            assert (r["grad"] - full[rank:rank + 2]).abs().max().item() <= TOL
    else:
        forward_side, backward_side = results[0]["sides"]
        assert abs(forward_side - backward_side) <= TOL * max(1.0, abs(forward_side)), (name, results[0]["sides"])
    if x_kind == "replicated":
        assert torch.equal(results[0]["grad"], results[1]["grad"]), name
    xs = [r["x"] for r in results]
    expected = {
        "copy_to_tp": xs,  # (replicated inputs: xs[0] == xs[1])
        "reduce_from_tp": [xs[0] + xs[1]] * 2,
        "gather_from_tp": [torch.cat(xs, -1)] * 2,
        "gather_along": [torch.cat(xs, 1)] * 2,
        "gather_along_replicated": [torch.cat(xs, 1)] * 2,
        "split_along": [x.chunk(2, 1)[r] for r, x in enumerate(xs)],
        "reduce_scatter_along": list((xs[0] + xs[1]).chunk(2, 1)),
        "all_reduce_both_ways": [xs[0] + xs[1]] * 2,
        "sum_grad_over_sharers": xs,
    }[name]
    for r, want in zip(results, expected):
        assert (r["out"] - want).abs().max().item() <= TOL, name


def _plain_rank(rank, world):
    from tp_plugin.runtime import comm

    group = dist.group.WORLD
    x = torch.arange(6.0).reshape(2, 3) + 10 * rank
    tensors = [torch.full((5,), float(rank)), torch.full((3, 2), float(rank + 1), dtype=torch.float64)]
    comm.BROADCAST_BUCKET_BYTES = 16  # one tensor per bucket: the bucketing itself is exercised
    comm.broadcast_from_rank0(tensors, group)
    return {"stacked": comm.all_gather_stacked(x, group), "along": comm.all_gather_along(x, 1, group),
            "equal": comm.all_equal(torch.tensor([1, 2]), group), "differ": comm.all_equal(torch.tensor([rank]), group),
            "broadcast": tensors}


def test_the_plain_collectives():
    """Outside autograd: the stacked and concatenated all-gathers, the equality check, the broadcast of TP rank 0's
    tensors (mixed dtypes, in buckets)."""
    results = run_ranks(2, _plain_rank)
    xs = [torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(2)]
    for r in results:
        assert torch.equal(r["stacked"], torch.stack(xs)) and torch.equal(r["along"], torch.cat(xs, 1))
        assert r["equal"] and not r["differ"]
        assert torch.equal(r["broadcast"][0], torch.zeros(5)) and torch.equal(r["broadcast"][1], torch.ones(3, 2,
                                                                                                       dtype=torch.float64))
