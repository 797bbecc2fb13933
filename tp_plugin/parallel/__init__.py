"""Parallelism beyond one TP group: FSDP2 over the data-parallel dim, pipeline stages and their saving.

May import: the split (`tp_plugin.parallelize`, the split model's state and mesh), `checkpoint/`, `runtime/`,
`sharding`; never `integrations/` or `tools/` (enforced by tests/test_layering.py).
"""
