"""Per-rank checkpoints for training: each TP rank writes its own shards, no gather, no full tensor anywhere.

Layout of a per-rank checkpoint directory:

    tp_shards.json                          format, tp_size, and per tensor: full shape, dtype, every rank's spec
    tp-rank-00000-of-00004.safetensors      TP rank 0's tensors, exactly as in memory (vocab padding included)
    ...
    config.json, generation_config.json     so it is self-describing (load at any degree, consolidate)

`tp_plugin.from_pretrained(dir, tp_size=N)` loads it at any degree the model splits into (resharding is a
matter of reading other rows); `consolidate` (also `tp-plugin consolidate`) turns it into an HF checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..runtime import devices
from ..state import mesh_of
from .gather import gathered, specs_of, tensor_entries, unwrap
from .io import CheckpointError, write_json
from .write import check_target, is_writer, save_model_config, staged, write_hf_files
from .sources import SHARDED_FORMAT, SHARDED_INDEX, ShardedSource, rank_file, spec_to_json


def save_sharded(model_or_engine, save_directory: str | os.PathLike) -> None:
    """Write this rank's shards (the ranks of data-parallel replica 0 write; call on every rank)."""
    model = unwrap(model_or_engine)
    devices.bind_current_device(model, "save_sharded")  # NCCL: its object broadcast runs on this rank's GPU
    mesh = mesh_of(model)
    target = check_target(save_directory)
    entries = tensor_entries(model)
    tp, tp_rank = (mesh.tp_size, mesh.tp_rank) if mesh is not None else (1, 0)
    in_replica0 = mesh is None or mesh.dp_rank == 0
    writer = is_writer()

    with staged(target, writer=writer, every_rank=True, shared=True) as tmp:
        local = {}
        for entry in entries:
            with gathered(entry.tensor) as tensor:
                if in_replica0:
                    local[entry.name] = tensor.clone() if hasattr(entry.tensor, "ds_id") else tensor.contiguous()
                    if entry.specs == [] and mesh is not None:
                        specs_of(entry, mesh)
        if in_replica0:
            save_file(local, str(tmp / rank_file(tp_rank, tp)), metadata={"format": "pt", "tp_rank": str(tp_rank)})
        del local
        if writer:
            tensors = {e.name: {"shape": list(e.shape), "dtype": str(e.dtype).removeprefix("torch."),
                                "specs": [spec_to_json(s) for s in (e.specs or [None] * tp)]} for e in entries}
            write_json(tmp / SHARDED_INDEX, {"format": SHARDED_FORMAT, "tp_size": tp, "tensors": tensors})
            save_model_config(model, tmp, [(e.name, e.dtype, e.shape) for e in entries])


def consolidate(sharded_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                progress: bool = True) -> Path:
    """A per-rank checkpoint -> an ordinary HF checkpoint, in one process, one full tensor in memory at a time."""
    sharded_dir = Path(sharded_dir)
    if not (sharded_dir / SHARDED_INDEX).is_file():
        raise CheckpointError(f"{sharded_dir} is not a tp_plugin per-rank checkpoint (no {SHARDED_INDEX}); "
                              f"an HF checkpoint needs no consolidation")
    source = ShardedSource(sharded_dir)
    target = check_target(out_dir)
    tensors = [(n, source.dtype(n), source.shape(n)) for n in source.names()]
    try:
        with staged(target, writer=True, every_rank=False) as tmp:  # one process: no other rank waits
            bar = (lambda it: tqdm(list(it), desc="consolidating", unit="tensor")) if progress else (lambda it: it)
            write_hf_files(tmp, tensors, lambda name: source.read(name, None), max_shard_size, writer=True,
                           progress=bar)
            for name in ("config.json", "generation_config.json"):
                if (sharded_dir / name).is_file():
                    shutil.copy2(sharded_dir / name, tmp / name)
    finally:
        source.close()
    return target
