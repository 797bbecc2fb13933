"""Checkpoint files: ordinary HF checkpoints saved from shards, per-rank checkpoints, the sources a split model
loads its slices from (`tp_plugin.loading` builds and splits the model on top of these).

    model = tp_plugin.from_pretrained(path, tp_size=2)     # each rank reads only its slices
    tp_plugin.save_pretrained(model_or_engine, out_dir)    # ordinary HF checkpoint, streamed through rank 0
    tp_plugin.save_sharded(model_or_engine, ckpt_dir)      # fast per-rank training checkpoint
    model = tp_plugin.from_pretrained(ckpt_dir, tp_size=4) # any degree the model splits into
    tp_plugin.checkpoint.consolidate(ckpt_dir, out_dir)    # or: tp-plugin consolidate CKPT_DIR OUT_DIR

May import: `runtime/`, `sharding`, the split model's state, mesh and checks; never the split itself, `parallel/`,
`integrations/` or `tools/` (enforced by tests/test_layering.py).
"""

from .io import CheckpointError
from .save import save_pretrained
from .sharded import consolidate, save_sharded

__all__ = ["save_pretrained", "save_sharded", "consolidate", "CheckpointError"]
