"""`tp_plugin.save_pretrained`: an ordinary HF checkpoint, streamed tensor by tensor from the TP shards.

Every rank walks the same tensors in the same order. The ranks of data-parallel replica 0 gather each
sharded tensor onto global rank 0 (TP rank 0 of replica 0), which writes it and lets it go; other replicas
only join ZeRO-3's own gathers. The files are written as every save writes them (`write.py`).
"""

from __future__ import annotations

import os

from torch import nn

from ..checks import check_tagged
from ..runtime.arrival import arrive_together
from ..runtime import devices
from ..state import mesh_of
from .gather import Entry, gather_full, gathered, tensor_entries, unwrap
from .write import check_target, is_writer, write_hf_checkpoint

ARRIVE_FIX = ("call it on every rank, not only on rank 0 (rank 0 writes; the others send their shards): "
              "model.save_pretrained(dir) or tp_plugin.save_pretrained(model, dir) outside any `if rank == 0:`")


def save_pretrained(model_or_engine, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Save a (split) model as an ordinary HF checkpoint that plain `transformers` loads.

    Call on every rank. Accepts a split or unsplit model, a DeepSpeed engine (ZeRO-1/2/3) holding one, a model
    sharded by FSDP2 (`tp_plugin.fully_shard`), or a `tp_plugin.pipeline` (every stage's tensors).
    """
    if not isinstance(model_or_engine, nn.Module):  # a `tp_plugin.Pipeline`: its stages write one checkpoint
        return model_or_engine.save_pretrained(save_directory, max_shard_size=max_shard_size)
    arrive_together("save_pretrained", ARRIVE_FIX)
    model = unwrap(model_or_engine)
    check_tagged(model, "save_pretrained")
    devices.bind_current_device(model, "save_pretrained")  # NCCL: the gathers run on this rank's GPU
    mesh = mesh_of(model)
    target = check_target(save_directory)
    entries = tensor_entries(model)
    by_name: dict[str, Entry] = {e.name: e for e in entries}
    in_replica0 = mesh is None or mesh.dp_rank == 0

    def fetch(name: str):
        entry = by_name[name]
        with gathered(entry.tensor) as local:
            full = gather_full(entry, local, mesh) if in_replica0 else None
            return full.clone() if full is not None and hasattr(entry.tensor, "ds_id") else full

    write_hf_checkpoint(target, model, [(e.name, e.dtype, e.shape) for e in entries], fetch, max_shard_size,
                        writer=is_writer())
