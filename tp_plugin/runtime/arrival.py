"""Calls every rank of a group must make, met in the default process group's key-value store rather than in a
collective: a call made on fewer ranks fails with a clear error after a bounded wait instead of hanging in the
first gather (saving: the world; `generate`, resizing, reading a training forward's logits: the TP group).
"""

from __future__ import annotations

import datetime
import os
import time
from collections import Counter

import torch.distributed as dist

from ..sharding import TPSplitError

TIMEOUT_ENV = "TP_PLUGIN_ARRIVAL_TIMEOUT"  # seconds; 60 by default
_calls: Counter = Counter()


def arrive_together(what: str, fix: str, *, group: dist.ProcessGroup | None = None,
                    timeout_s: float | None = None) -> None:
    """Return once every rank of `group` (default: the world) has called `arrive_together(what, ...)` the same
    number of times; raise a clear error on the ranks that did, if the others have not arrived within `timeout_s`.

    The ranks meet in the default process group's store: the last to arrive sets the verdict "go"; a rank
    that times out sets "missing". The store's compare-and-set decides between the two atomically, so all
    ranks that arrive get the same verdict and no rank enters the collectives that follow alone. Each group
    counts its own calls: data-parallel replicas may call `generate` different numbers of times.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    timeout_s = float(os.environ.get(TIMEOUT_ENV, 60)) if timeout_s is None else timeout_s
    store = dist.distributed_c10d._get_default_store()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    members = "world" if group is None else "-".join(map(str, ranks))
    _calls[(what, members)] += 1
    key, size = f"tp_plugin/arrive/{what}/{members}/{_calls[(what, members)]}", len(ranks)
    verdict_key = f"{key}/verdict"
    if store.add(f"{key}/count", 1) == size:
        store.compare_set(verdict_key, "", "go")
    deadline, pause = time.monotonic() + timeout_s, 0.0002
    while not store.check([verdict_key]):
        if time.monotonic() > deadline:
            store.compare_set(verdict_key, "", "missing")
            break
        time.sleep(pause)
        pause = min(2 * pause, 0.05)  # quick when the ranks arrive together, cheap when one never comes
    verdict = store.get(verdict_key).decode()
    if verdict != "go":
        arrived = store.add(f"{key}/count", 0)
        where = "" if group is None else f" of tensor-parallel group {ranks}"
        raise TPSplitError(f"tp_plugin: {what} must be called on every rank{where} (each holds part of the model), "
                           f"but only {arrived} of {size} ranks{where} called it within {timeout_s:g} s (rank "
                           f"{dist.get_rank()} did and waited); nothing was done. Fix: {fix}")


def exchange_over_store(what: str, value: str, *, timeout_s: float | None = None) -> list[str]:
    """Every rank's `value` (rank order), through the default process group's store rather than a collective
    (for what must be known before the first collective can run); a clear error when a rank has not posted its
    value within `timeout_s`."""
    timeout_s = float(os.environ.get(TIMEOUT_ENV, 60)) if timeout_s is None else timeout_s
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    _calls[(what, "exchange")] += 1
    key = f"tp_plugin/exchange/{what}/{_calls[(what, 'exchange')]}"
    store.set(f"{key}/{dist.get_rank()}", value)
    keys = [f"{key}/{r}" for r in range(world)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError):
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise TPSplitError(f"tp_plugin: {what}: ranks {missing} of {world} did not arrive within {timeout_s:g} s "
                           f"(rank {dist.get_rank()} did and waited); call it on every rank") from None
    return [store.get(k).decode() for k in keys]
