"""Writing a checkpoint directory, shared by every save (`save_pretrained`, `save_sharded`, `consolidate`, the
pipeline's save).

A save builds the new checkpoint in a temporary directory next to the target (`staged`), carries over what else
the target held (tokenizer, trainer state), and swaps it in with one rename, so an interrupted save leaves the
previous checkpoint whole and a failed one leaves nothing behind. The HF weight files are grouped and named by
`huggingface_hub.split_torch_state_dict_into_shards` (the helper transformers uses) and written tensor by tensor
(`write_hf_files`), so the writer holds one full tensor at a time.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards

from ..mesh import world_size
from .io import CheckpointError, StreamingWriter, commit_dir, make_temp_dir, write_json
from .sources import SAFE_INDEX, SHARDED_INDEX

Tensors = list[tuple[str, torch.dtype, tuple[int, ...]]]  # name, dtype, full shape, in writing order

# Files of an earlier checkpoint in the target directory that a new save replaces rather than keeps.
_WEIGHT_FILES = ("model.safetensors", "model-0", SAFE_INDEX, "pytorch_model", SHARDED_INDEX, "tp-rank-",
                 "config.json", "generation_config.json")


def is_writer() -> bool:
    """Global rank 0 writes the files every save writes once (a job without a process group: its one process)."""
    return world_size() == 1 or dist.get_rank() == 0


def check_target(directory: str | os.PathLike) -> Path:
    """Refuse a target that cannot become a checkpoint directory (same answer on every rank)."""
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {target}: it exists and is not a directory")
    return target


@contextmanager
def staged(target: Path, *, writer: bool, every_rank: bool, shared: bool = False) -> Iterator[Path | None]:
    """A temporary directory that becomes `target` when the block ends without an error (removed if it raises).

    `writer`: this rank creates and commits it (it is `None` elsewhere unless `shared`). `every_rank`: all ranks
    of the job enter the block and return only once the checkpoint is in place. `shared`: every rank writes
    files into the one directory (the writer's path is broadcast; the writer commits after all have written).
    """
    collective = every_rank and world_size() > 1
    tmp = make_temp_dir(target) if writer else None
    if shared and collective:
        box = [str(tmp) if writer else None]
        dist.broadcast_object_list(box, group_src=0)  # (the writer is global rank 0)
        tmp = Path(box[0])
    try:
        yield tmp
        if shared and collective:
            dist.barrier()  # every rank's files are written before the directory is swapped in
        if writer:
            carry_over(target, tmp)
            commit_dir(tmp, target)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if collective:
        dist.barrier()  # nobody returns before the checkpoint is in place


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


def save_model_config(model, tmp: Path, tensors: Tensors) -> None:
    """`model`'s config (its class as the architecture, the first floating dtype of `tensors`) and generation
    config, as `transformers`' own save writes them."""
    dtype = next((dtype for _, dtype, _ in tensors if dtype.is_floating_point), None)
    generation = getattr(model, "generation_config", None) if model.can_generate() else None
    save_config(model.config, generation, tmp, type(model).__name__, dtype)


def write_hf_files(tmp: Path, tensors: Tensors, fetch: Callable[[str], torch.Tensor | None],
                   max_shard_size: int | str, *, writer: bool,
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


def write_hf_checkpoint(target: Path, model, tensors: Tensors, fetch: Callable[[str], torch.Tensor | None],
                        max_shard_size: int | str, *, writer: bool) -> None:
    """An ordinary HF checkpoint of `model` at `target`: the weights fetched one by one, its config, and what
    else the target held; called on every rank, each returns once the checkpoint is in place."""
    with staged(target, writer=writer, every_rank=True) as tmp:
        write_hf_files(tmp, tensors, fetch, max_shard_size, writer=writer)
        if writer:
            save_model_config(model, tmp, tensors)
