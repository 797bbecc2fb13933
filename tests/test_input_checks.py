"""The check that every TP rank got the same inputs (tp_plugin/checks.py): a plain loop whose TP ranks get
different batches (a `DistributedSampler` over the whole world, the DDP habit) fails on every rank with the fix,
before any forward collective runs; on a correct loop the check runs at the first training forward only and
costs one small all-gather, later forwards do without it.
"""

from __future__ import annotations

import torch

import tp_plugin
from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks
from tests.models import batch, build


def _world_sharded_loop(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model.train()
    data = torch.randint(3, 101, (8, 12), generator=torch.Generator().manual_seed(0))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)  # DDP habit
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    ids = next(iter(loader))
    with CollectiveCounter() as counter:
        try:
            model(ids, labels=ids)
        except RuntimeError as exc:
            return str(exc), dict(counter.counts)
    return None, dict(counter.counts)


def test_plain_loop_with_world_sharded_batches_fails_on_every_rank():
    for message, counts in run_ranks(2, _world_sharded_loop):
        assert message is not None and "got different batches" in message, message
        assert "TPTrainer" in message and "DistributedSampler" in message, message
        assert counts == {"all_gather": 1}, counts  # the check, then nothing: no forward collective ran


def _same_batch_once(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model.train()
    ids = batch()
    with CollectiveCounter() as first:
        model(ids, labels=ids).loss.backward()
    with CollectiveCounter() as second:
        model(ids, labels=ids).loss.backward()
    return dict(first.counts), dict(second.counts)


def test_the_check_runs_once_and_costs_one_small_all_gather():
    for first, second in run_ranks(2, _same_batch_once):
        # + the check's one all-gather (the second step has none: the logits are not read, so never gathered)
        assert first["all_gather"] == second.get("all_gather", 0) + 1, (first, second)
        assert {k: v for k, v in first.items() if k != "all_gather"} == \
            {k: v for k, v in second.items() if k != "all_gather"}, (first, second)
