"""`tp_plugin.from_pretrained`: build on meta, split, then each rank reads only its own slices.

Order, so that bad input fails on every rank before any collective: find the files -> read their headers
(truncation) -> config -> meta model -> check every tensor's name and shape -> resolve the plan at the wanted
degree -> `parallelize` (first collective) -> read this rank's rows, tensor by tensor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from .runtime import devices
from .checks import check_one_gpu_per_rank
from .mesh import check_layout, world_size
from .integrations.accelerate import prepare_launch
from .parallelize import parallelize
from .split import policy_for, resolve_tp_size
from .plan import resolve_plan
from .sharding import TPSplitError
from .checkpoint.build import build_on_meta, check_source, materialize, zero3_init_off
from .checkpoint.io import CheckpointError
from .checkpoint.sources import SAFE_INDEX, SAFE_WEIGHTS, SHARDED_INDEX, SafetensorsSource, ShardedSource

logger = logging.getLogger("tp_plugin")

_MODEL_KWARGS = ("attn_implementation", "trust_remote_code")


def resolve_dir(path: str | os.PathLike, revision: str | None = None, cache_dir=None) -> Path:
    """A local directory, or a hub id already in the local HF cache (never downloads)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path), revision=revision, cache_dir=cache_dir,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{path!r} is neither a local directory nor a model in the local Hugging Face cache "
                              f"(tp_plugin.from_pretrained never downloads): {exc}. Pass a directory, or download "
                              f"it first (`huggingface-cli download {path}`) where the hub is reachable.") from None


def open_source(directory: Path):
    """The reader for `directory`, or None when it holds a format only transformers reads (GGUF, .bin)."""
    if (directory / SHARDED_INDEX).is_file():
        return ShardedSource(directory)
    if (directory / SAFE_INDEX).is_file() or (directory / SAFE_WEIGHTS).is_file():
        return SafetensorsSource(directory)
    return None


def _resolve_dtype(dtype, config, source) -> torch.dtype:
    """Like transformers' default `dtype="auto"`: the config's dtype, else the first float tensor's."""
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is None and source is not None:
            dtype = next((source.dtype(n) for n in source.names() if source.dtype(n).is_floating_point), None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _is_rank0() -> bool:
    return world_size() == 1 or torch.distributed.get_rank() == 0


def from_pretrained(path: str | os.PathLike, tp_size: int | None = None, *, torch_dtype=None, policy=None,
                    loss_parallel: bool = False, sequence_parallel: bool | None = None, overlap_comm: bool = True,
                    auto_class=None, revision: str | None = None, pp_size: int | None = None,
                    pipeline_kwargs: dict | None = None, **kwargs):
    """Load a checkpoint straight into this rank's shards and return the split model (in eval mode, like
    transformers). `path`: an HF safetensors checkpoint (one file or several with an index), a per-rank
    checkpoint from `save_sharded` saved at any TP degree (resharded on the fly), or a hub id in the offline
    cache. Other formats (GGUF via `gguf_file=`, `.bin`) are loaded whole by transformers, then split.
    At tp=1 the result is an ordinary, unsplit transformers model. Extra kwargs go to the config
    (`AutoConfig.from_pretrained`), except `attn_implementation` / `trust_remote_code` (to the model) and `config`
    (a config object to use instead). `auto_class`: an Auto class (default `AutoModelForCausalLM`) or a model
    class. `policy`, `loss_parallel`, `sequence_parallel`, `overlap_comm`: as for `tp_plugin.parallelize`.

    `pp_size=P` returns a `tp_plugin.Pipeline` instead (in eval mode): the world forms a ("pp", "dp", "tp") mesh of
    P stages x (world / (P x tp)) replicas x tp, each rank's stage is carved on the meta device and only its
    layers' slices are read. `pipeline_kwargs` go to `tp_plugin.pipeline` (microbatches, schedule, split)."""
    prepare_launch()  # `accelerate launch` without GPU: the process group first (integrations/accelerate.py)
    with zero3_init_off():  # under a registered ZeRO-3 config too: whole on meta, partitioned later over DP
        split = dict(policy=policy, loss_parallel=loss_parallel, sequence_parallel=sequence_parallel,
                     overlap_comm=overlap_comm)
        return _from_pretrained(path, tp_size, torch_dtype=torch_dtype, split=split, auto_class=auto_class,
                                revision=revision, pp_size=pp_size, pipeline_kwargs=pipeline_kwargs, **kwargs)


def _from_pretrained(path, tp_size, *, torch_dtype, split: dict, auto_class, revision, pp_size, pipeline_kwargs,
                     **kwargs):
    auto_class = auto_class or transformers.AutoModelForCausalLM
    dtype = torch_dtype if torch_dtype is not None else kwargs.pop("dtype", None)
    directory = resolve_dir(path, revision, kwargs.pop("cache_dir", None))
    source = None if "gguf_file" in kwargs else open_source(directory)
    if source is None:
        return _load_then_split(directory, tp_size, dtype, split, auto_class, kwargs)

    model_kwargs = {k: kwargs.pop(k) for k in _MODEL_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(directory, **kwargs)
    dtype = _resolve_dtype(dtype, config, source)
    model = build_on_meta(config, dtype, auto_class, **model_kwargs)
    check_source(model, source)
    if pp_size is not None:
        return _load_pipeline(model, source, directory, tp_size or 1, pp_size, split["loss_parallel"],
                              pipeline_kwargs or {})
    tp = resolve_tp_size(tp_size)
    if tp > 1:
        _check_degree(model, split["policy"], tp, source)
        parallelize(model, tp, **split)
    try:
        materialize(model, source, show_progress=_is_rank0())
    finally:
        source.close()
    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model.eval()


def _load_pipeline(model, source, directory: Path, tp: int, pp: int, loss_parallel: bool, kwargs: dict):
    """Carve this rank's stages on the meta device (split over TP), then read only their tensors' slices."""
    from torch.distributed.device_mesh import init_device_mesh

    from .parallel.pipeline import pipeline

    world = world_size()
    if pp < 1 or world % (pp * tp):
        raise TPSplitError(f"from_pretrained(pp_size={pp}, tp_size={tp}): pp x tp must divide the world size "
                           f"{world}")
    if tp > 1:
        _check_degree(model, None, tp, source)
    devices.bind_current_device(model, "from_pretrained(pp_size=...)")  # NCCL: this rank's GPU current before the mesh
    check_one_gpu_per_rank("from_pretrained(pp_size=...)")
    mesh = init_device_mesh(devices.mesh_device_type(model), (pp, world // (pp * tp), tp), mesh_dim_names=("pp", "dp", "tp"))
    pipe = pipeline(model, mesh=mesh, loss_parallel=loss_parallel, **kwargs)
    try:
        for stage in pipe.stages:
            materialize(stage.model, source, show_progress=_is_rank0())
    finally:
        source.close()
    if kwargs.get("data_parallel") == "fsdp2":
        pipe.shard_data_parallel()
    return pipe.eval()


def _check_degree(model: nn.Module, policy, tp: int, source) -> None:
    """The layout and the plan at `tp` (pure): a per-rank checkpoint names the degree it was saved at."""
    check_layout(tp)
    try:
        resolve_plan(model, policy or policy_for(model, tp), tp)
    except TPSplitError as exc:
        if source.kind != "sharded":
            raise
        raise CheckpointError(f"{source.directory}: this per-rank checkpoint (saved at tp={source.tp_size}) can be "
                              f"resharded to any degree the model splits into, but not tp={tp}: {exc}") from None


def _load_then_split(directory: Path, tp_size, dtype, split: dict, auto_class, kwargs) -> nn.Module:
    """Formats that only transformers reads: every rank loads the whole model, then keeps its shards."""
    if kwargs.pop("weights_only", True) is not True:
        raise CheckpointError("tp_plugin.from_pretrained loads pickled (.bin) checkpoints only with "
                              "weights_only=True (no arbitrary code at load time); convert the checkpoint to "
                              "safetensors instead")
    what = f"gguf file {kwargs['gguf_file']}" if "gguf_file" in kwargs else \
        f"no {SAFE_WEIGHTS}, {SAFE_INDEX} or {SHARDED_INDEX}"
    if _is_rank0():
        logger.warning("tp_plugin.from_pretrained(%s): %s, so falling back to load-then-split: every rank loads "
                       "the whole model with transformers, then keeps its shards (peak memory: the full model "
                       "per rank). Save it with tp_plugin.save_pretrained to load only the shards next time.",
                       directory, what)
    model = auto_class.from_pretrained(directory, dtype=dtype if dtype is not None else "auto", weights_only=True,
                                       **kwargs)
    tp = resolve_tp_size(tp_size)
    return parallelize(model, tp, **split) if tp > 1 else model
