"""Count torch.distributed collectives by name, whoever calls them."""

from __future__ import annotations

import collections

import torch.distributed as dist

COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "all_gather_object", "broadcast_object_list", "barrier"]


def _ring_bytes(name: str, args, kwargs) -> float:
    """Bytes one rank sends in a ring implementation: an all-reduce of N bytes sends 2 (p-1)/p N, an all-gather
    or reduce-scatter whose full tensor is N bytes sends (p-1)/p N (the volume sequence parallelism is held to)."""
    group = kwargs.get("group")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    share = (world - 1) / world
    if name == "all_reduce":
        t = args[0]
        return 2 * share * t.numel() * t.element_size()
    if name == "all_gather" and isinstance(args[0], list):
        return share * sum(t.numel() * t.element_size() for t in args[0])
    if name == "reduce_scatter" and isinstance(args[1], list):
        return share * sum(t.numel() * t.element_size() for t in args[1])
    return 0.0


class CollectiveCounter:
    """Wrap torch.distributed's collectives and count calls by name (whoever calls them), and the bytes each
    rank sends in them (`ring_bytes`, by name)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.ring_bytes = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                self.ring_bytes[_name] += _ring_bytes(_name, args, kwargs)
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
