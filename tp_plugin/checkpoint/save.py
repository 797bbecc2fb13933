"""`tp_plugin.save_pretrained`: an ordinary HF checkpoint, streamed tensor by tensor from the TP shards.

Every rank walks the same tensors in the same order. The ranks of data-parallel replica 0 gather each
sharded tensor onto global rank 0 (TP rank 0 of replica 0), which writes it and lets it go; other replicas
only join ZeRO-3's own gathers. Files are named and grouped by `huggingface_hub.split_torch_state_dict_into_shards`
(the helper transformers uses), written into a temporary directory next to the target, fsynced and swapped
in, so an interrupted save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards
from torch import nn

from ..checks import arrive_together, check_tagged
from ..runtime import devices
from ..mesh import world_size
from ..state import mesh_of
from .gather import Entry, gather_full, gathered, tensor_entries, unwrap
from .io import CheckpointError, StreamingWriter, commit_dir, make_temp_dir, write_json
from .sources import SAFE_INDEX, SHARDED_INDEX

# Files of an earlier checkpoint in the target directory that a new save replaces rather than keeps.
_WEIGHT_FILES = ("model.safetensors", "model-0", SAFE_INDEX, "pytorch_model", SHARDED_INDEX, "tp-rank-",
                 "config.json", "generation_config.json")


def check_target(directory: str | os.PathLike) -> Path:
    """Refuse a target that cannot become a checkpoint directory (same answer on every rank)."""
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {target}: it exists and is not a directory")
    return target


def carry_over(target: Path, tmp: Path) -> None:
    """Keep what else lives in the target directory (tokenizer, trainer state) by hard-linking it into `tmp`."""
    if not target.is_dir():
        return
    for item in target.iterdir():
        if item.name.startswith(_WEIGHT_FILES) or (tmp / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name, copy_function=os.link, symlinks=True)
        else:
            os.link(item, tmp / item.name)


def save_config(model_config, generation_config, tmp: Path, architecture: str | None, dtype) -> None:
    config = copy.deepcopy(model_config)
    if architecture:
        config.architectures = [architecture]
    if dtype is not None:  # (transformers 4.x names it `torch_dtype` and would write `dtype` as a raw object)
        import transformers

        setattr(config, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)


def write_hf_files(tmp: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                   fetch: Callable[[str], torch.Tensor | None], max_shard_size: int | str, *, writer: bool,
                   progress: Callable[[Iterable], Iterable] = lambda it: it) -> None:
    """Write `tensors` as HF safetensors files (+ index when several), fetching each one just before writing.

    `fetch(name)` runs on every rank (it may be collective) and returns the full tensor on the writer.
    """
    meta_dict = {name: torch.empty(shape, dtype=dtype, device="meta") for name, dtype, shape in tensors}
    split = split_torch_state_dict_into_shards(meta_dict, max_shard_size=max_shard_size)
    by_name = {name: (name, dtype, tuple(shape)) for name, dtype, shape in tensors}
    order = [(f, n) for f, names in split.filename_to_tensors.items() for n in names]
    current, file = None, None
    try:
        for filename, name in progress(order):
            if writer and filename != current:
                if file is not None:
                    file.close()
                names = split.filename_to_tensors[filename]
                file = StreamingWriter(tmp / filename, [by_name[n] for n in names], {"format": "pt"})
                current = filename
            full = fetch(name)
            if writer:
                file.write(name, full)
            del full
        if file is not None:
            file.close()
            file = None
    finally:
        if file is not None:
            file.abort()
    if writer and split.is_sharded:
        write_json(tmp / SAFE_INDEX, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})


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
    is_writer = world_size() == 1 or dist.get_rank() == 0
    in_replica0 = mesh is None or mesh.dp_rank == 0

    def fetch(name: str):
        entry = by_name[name]
        with gathered(entry.tensor) as local:
            full = gather_full(entry, local, mesh) if in_replica0 else None
            return full.clone() if full is not None and hasattr(entry.tensor, "ds_id") else full

    write_checkpoint(target, model, [(e.name, e.dtype, e.shape) for e in entries], fetch, max_shard_size,
                     writer=is_writer)


def write_checkpoint(target: Path, model, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                     fetch: Callable[[str], torch.Tensor | None], max_shard_size: int | str, *, writer: bool) -> None:
    """The weights (`write_hf_files`), `model`'s config and what else the target holds, into a temporary directory
    swapped in at the end by the writer; every rank returns once the checkpoint is in place."""
    tmp = make_temp_dir(target) if writer else None
    try:
        write_hf_files(tmp, tensors, fetch, max_shard_size, writer=writer)
        if writer:
            dtype = next((dtype for _, dtype, _ in tensors if dtype.is_floating_point), None)
            generation = getattr(model, "generation_config", None) if model.can_generate() else None
            save_config(model.config, generation, tmp, type(model).__name__, dtype)
            carry_over(target, tmp)
            commit_dir(tmp, target)
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if world_size() > 1:
        dist.barrier()  # nobody returns before the checkpoint is in place
