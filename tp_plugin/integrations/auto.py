"""Zero-code splitting, under `tp-plugin launch` (`tp_plugin.launch`): the models a script loads come out split,
and every Trainer is a TP Trainer. Installed by `tp_plugin.launch.activate()` only; `uninstall()` undoes it.

* `PreTrainedModel.from_pretrained` (transformers.modeling_utils; every model class and Auto class loads through
  it): when the launch's TP degree is above 1 (`--tp`, else the launch config's, else the world size), the load
  goes to `tp_plugin.from_pretrained`, which builds the model on the meta device and reads only this rank's
  slices. A load with options only transformers knows (`quantization_config`, a `device_map` that spreads the
  model, `state_dict=`, positional model arguments, ...), or from a format tp_plugin does not read, is done by
  transformers whole and then split (`parallelize`). A model that cannot be split fails as `parallelize` does.
* `Trainer.__new__`: an instance of any Trainer class (transformers', TRL's, a user's subclass) is made from
  `TPTrainerMixin` in front of that class (one derived class per class, cached), exactly as
  `class MyTrainer(TPTrainerMixin, SFTTrainer)` would; the mixin defers to the class when the model is not split.
* On a machine without GPU only, `PartialState.__init__`: a DeepSpeed state asked for without a backend (what
  `TrainingArguments(deepspeed=...)` does) gets gloo, so a `--deepspeed` Trainer script sees its processes (the
  zero-code form of `tp_plugin.integrations.trainer.prepare_cpu_deepspeed`).

Before a load, the process group is started if the launcher has not (torchrun leaves that to the script): with
Accelerate's `PartialState`, which the Trainer and Accelerator then use (gloo on a machine without GPU).
"""

from __future__ import annotations

import functools
import logging
import os
import threading

from . import patching

logger = logging.getLogger("tp_plugin")

# Keyword arguments `tp_plugin.from_pretrained` honours (or that do not matter to a load on this rank's device).
_ROUTED = {"config", "dtype", "torch_dtype", "attn_implementation", "trust_remote_code", "revision", "cache_dir",
           "local_files_only", "low_cpu_mem_usage", "use_safetensors", "device_map", "token", "_from_auto",
           "_from_pipeline", "adapter_kwargs"}  # (adapter_kwargs: what the Auto classes pass, {"revision": None})
_DROPPED = {"local_files_only", "low_cpu_mem_usage", "use_safetensors", "device_map", "token", "_from_auto",
            "_from_pipeline", "adapter_kwargs"}
_loading = threading.local()  # set while tp_plugin loads: transformers' own calls inside are left alone
_REPLACED: list[tuple[object, str]] = []  # (owner, attribute) replaced here, in installation order


def _degree() -> int:
    from ..launch_config import configured_tp_size

    return configured_tp_size() or int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group() -> None:
    """The launch's process group, if nobody has started it yet (torchrun leaves it to the script)."""
    import torch.distributed as dist

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    from .accelerate import _has_gpu, prepare_cpu_launch

    prepare_cpu_launch()  # `accelerate launch` without GPU: gloo, as the yaml's type needs
    if not dist.is_initialized():
        PartialState(cpu=not _has_gpu())  # nccl on this rank's GPU, else gloo


def _routable(path, model_args: tuple, kwargs: dict) -> bool:
    from pathlib import Path

    directory, device_map = Path(str(path)), kwargs.get("device_map")
    adapter = (directory / "adapter_config.json").is_file() or any(v is not None for v in
                                                                   (kwargs.get("adapter_kwargs") or {}).values())
    return not model_args and set(kwargs) <= _ROUTED and directory.is_dir() and not adapter \
        and (device_map in (None, "auto", "cpu", "cuda") or isinstance(device_map, int))


def _wrap_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if getattr(_loading, "active", False):
            return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        tp = _degree()
        if tp <= 1:
            return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        from .. import from_pretrained as tp_from_pretrained
        from .. import parallelize
        from ..checkpoint.build import zero3_init_off
        from ..launch_config import configured_loss_parallel

        start_process_group()
        loss_parallel = configured_loss_parallel() and cls.can_generate()
        _loading.active = True
        try:
            if _routable(pretrained_model_name_or_path, model_args, kwargs):
                routed = {k: v for k, v in kwargs.items() if k not in _DROPPED}
                dtype = routed.pop("dtype", None)
                model = tp_from_pretrained(pretrained_model_name_or_path, tp, auto_class=cls,
                                           torch_dtype=routed.pop("torch_dtype", dtype), loss_parallel=loss_parallel,
                                           **routed)
            else:
                logger.info("tp_plugin (zero-code): %s.from_pretrained(%s) with %s: transformers loads it whole, "
                            "then it is split", cls.__name__, pretrained_model_name_or_path, sorted(kwargs))
                with zero3_init_off():  # whole on every rank, then split (ZeRO-3 partitions the shards later)
                    model = original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
                model = parallelize(model, tp, loss_parallel=loss_parallel)
        finally:
            _loading.active = False
        return _placed(model, kwargs.get("device_map"))
    return classmethod(from_pretrained)


def _placed(model, device_map):
    """transformers puts a model with a `device_map` on the accelerator: this rank's, for a split model."""
    import torch

    if device_map in (None, "cpu") or not torch.cuda.is_available():
        return model
    return model.to(torch.device("cuda", torch.cuda.current_device()))


@functools.cache
def _with_mixin(cls: type) -> type:
    from .trainer import TPTrainerMixin

    return type(cls.__name__, (TPTrainerMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                      "__doc__": cls.__doc__})


def _trainer_new(cls, *args, **kwargs):
    from .trainer import TPTrainerMixin

    return object.__new__(cls if issubclass(cls, TPTrainerMixin) else _with_mixin(cls))


def _wrap_partial_state_init(original):
    @functools.wraps(original)
    def __init__(self, cpu: bool = False, **kwargs):
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if deepspeed and not cpu and kwargs.get("backend") is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs["backend"] = "gloo"
        original(self, cpu, **kwargs)
    return __init__


def _patch_cpu_deepspeed_backend() -> None:
    from accelerate import PartialState

    from .accelerate import _has_gpu

    if _has_gpu() or patching.is_replaced(PartialState, "__init__"):
        return
    _replace(PartialState, "__init__", _wrap_partial_state_init(PartialState.__init__))


def _replace(owner, name: str, value) -> None:
    if patching.replace(owner, name, value):
        _REPLACED.append((owner, name))


def _patch_from_pretrained() -> None:
    from transformers.modeling_utils import PreTrainedModel

    if patching.is_replaced(PreTrainedModel, "from_pretrained"):
        return
    _replace(PreTrainedModel, "from_pretrained",
             _wrap_from_pretrained(PreTrainedModel.__dict__["from_pretrained"].__func__))


def _patch_trainer() -> None:
    from transformers import Trainer

    if patching.is_replaced(Trainer, "__new__"):
        return
    _replace(Trainer, "__new__", _trainer_new)


def install() -> None:
    """The patches, each as soon as its module is imported (idempotent)."""
    from . import on_uninstall, when_imported

    on_uninstall(uninstall)
    when_imported("transformers.modeling_utils", _patch_from_pretrained)
    when_imported("transformers.trainer", _patch_trainer)
    when_imported("accelerate", _patch_cpu_deepspeed_backend)


def uninstall() -> None:
    while _REPLACED:
        patching.restore(*_REPLACED.pop())
    _with_mixin.cache_clear()
