"""Count torch.distributed collectives by name, whoever calls them."""

from __future__ import annotations

import collections

import torch.distributed as dist

COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "all_gather_object", "broadcast_object_list", "barrier"]


class CollectiveCounter:
    """Wrap torch.distributed's collectives and count calls by name (whoever calls them)."""

    def __init__(self):
        self.counts = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
