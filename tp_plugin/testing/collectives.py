"""Count torch.distributed collectives by name, whoever calls them."""

from __future__ import annotations

import collections

import torch.distributed as dist

COLLECTIVES = [name for name in ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                                  "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast",
                                  "all_to_all", "all_to_all_single", "all_gather_object", "broadcast_object_list",
                                  "barrier"]
               if hasattr(dist, name)]  # (the *_single names: torch >= 2.13)


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
    if name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single"):  # (output, input): the full one is the larger
        return share * max(t.numel() * t.element_size() for t in args[:2])
    return 0.0


# The one-buffer forms are the same collectives as the list forms: counted under one kind.
KIND = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter"}


class CollectiveCounter:
    """Wrap torch.distributed's collectives and count calls by kind (whoever calls them: `counts`, an
    all-gather into one tensor counted as an "all_gather"), by the exact function called (`calls`), and the
    bytes each rank sends in them (`ring_bytes`, by kind)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.calls = collections.Counter()
        self.ring_bytes = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                kind = KIND.get(_name, _name)
                self.counts[kind] += 1
                self.calls[_name] += 1
                self.ring_bytes[kind] += _ring_bytes(_name, args, kwargs)
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
