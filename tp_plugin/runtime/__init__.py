"""What a split model runs: the collectives and their duals, the parallel layers, the regions between them,
sequence parallelism, the vocabulary-parallel loss, the RNG streams, the device a rank's collectives use.

May import: `tp_plugin.sharding` and this package only (enforced by tests/test_layering.py). Nothing here
knows about plans, policies, checkpoints, engines or trainers.
"""
