"""Checkpoints: load HF safetensors straight into shards, save ordinary HF checkpoints, per-rank save + reshard.

    model = tp_plugin.from_pretrained(path, tp_size=2)     # each rank reads only its slices
    tp_plugin.save_pretrained(model_or_engine, out_dir)    # ordinary HF checkpoint, streamed through rank 0
    tp_plugin.save_sharded(model_or_engine, ckpt_dir)      # fast per-rank training checkpoint
    model = tp_plugin.from_pretrained(ckpt_dir, tp_size=4) # any degree the model splits into
    tp_plugin.checkpoint.consolidate(ckpt_dir, out_dir)    # or: tp-plugin consolidate CKPT_DIR OUT_DIR
"""

from .io import CheckpointError
from .load import from_pretrained
from .save import save_pretrained
from .sharded import consolidate, save_sharded

__all__ = ["from_pretrained", "save_pretrained", "save_sharded", "consolidate", "CheckpointError"]
