"""Bridges between split models and the engines that train them, and the one list of every change tp_plugin
makes to another library.

`import tp_plugin` changes nothing outside tp_plugin. `tp_plugin.parallelize` (and `from_pretrained`), when it
splits a model (tp > 1), calls `activate()`: each patch below is installed as soon as its library is imported
(now, or from a one-shot import hook), and `uninstall()` undoes all of them. Every wrapper defers to the library's
own code unless a model split by tp_plugin is involved.

| library | what is changed | where | why |
| --- | --- | --- | --- |
| accelerate | `Accelerator.prepare`, `prepare_model`, `prepare_data_loader`, `clip_grad_norm_`, `save_state`, `load_state` (wrapped) | `accelerate/__init__.py` | DDP and data sharding over the DP group, TP-correct clipping, resumable states of every TP rank |
| accelerate | `accelerate.accelerator.save_accelerator_state`, `load_accelerator_state` (wrapped, in that module's namespace; active only inside `save_state` / `load_state` of a split model under DDP) | accelerate/ddp_state.py | each TP rank's model and optimizer state kept |
| accelerate | `accelerate.accelerator.fsdp2_prepare_model`, `save_fsdp_model`, `load_fsdp_model`, `save_fsdp_optimizer`, `load_fsdp_optimizer` (wrapped, in that module's namespace) | accelerate/fsdp_state.py | FSDP2 over the DP dim only; each TP rank's resumable state kept |
| accelerate | `Accelerator.gather_for_metrics`, `PartialState.split_between_processes` (wrapped) | accelerate/data.py | each sample counted once in evaluation and metrics; inference inputs divided over DP replicas |
| accelerate | env `ACCELERATE_USE_PARALLELISM_CONFIG=false` and, without a GPU, Accelerate's `PartialState` on gloo (under `accelerate launch` only, before the split) | accelerate.py `prepare_launch` | the yaml's TP degree is ours; CPU launches get a backend |
| peft | `BaseTuner.inject_adapter`, `PeftModel.__init__`, `PeftModel.save_pretrained`, `get_peft_model_state_dict` (4 modules), `IA3Model._create_new_module`, `TrainableTokensWrapper.init_modules`, `peft.utils.save_and_load.has_valid_embedding_base_layer` | peft/patches.py | TP LoRA / DoRA / IA3 / token layers, refusals, unsplit adapters |
| trl | `trl.trainer.utils._ChunkedLogProbFunction` (a dispatcher) | trl.py | the fused LM head over the whole vocabulary |
| transformers | `PreTrainedModel.from_pretrained` (wrapped), `Trainer.__new__` (added); under `tp-plugin launch` only | auto.py | zero code: loaded models come out split, every Trainer is a TP Trainer |
| transformers | `transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref` read as empty for the duration of a `tp_plugin.from_pretrained` load | ../checkpoint/build.py `zero3_init_off` | a registered ZeRO-3 config would build the model under zero.Init, which a split cannot start from |
| accelerate | without a GPU, `PartialState.__init__` (a DeepSpeed state asked for without a backend gets gloo); under `tp-plugin launch` only | auto.py | `--deepspeed` Trainer scripts see their processes on CPU |
| python | `sitecustomize` (`tp_plugin/_site`, first on PYTHONPATH), which calls `tp_plugin.launch.activate()` once transformers or accelerate is imported; under `tp-plugin launch` only (`TP_PLUGIN_AUTO=1`) | ../_site/sitecustomize.py | every process the launch command starts splits |
| deepspeed | nothing patched: the split model carries DeepSpeed's own hooks (`set_deepspeed_parallelism`, `ds_autotp_parsed`), which fill DeepSpeed's group registry during `initialize` | deepspeed.py | ZeRO over the DP group |

Turn them off: `TP_PLUGIN_PATCHES=none` (or a comma-separated subset to keep, e.g. `peft,trl`) before the
split, or `tp_plugin.integrations.uninstall()` at any time. `TPTrainerMixin` installs the Accelerate wrappers
itself (it is the Trainer's route for split models) and scopes its GRPO/RLOO changes to their calls.

May import: everything below the front door (the split, `parallel/`, `checkpoint/`, `runtime/`, plan time);
`auto.py` and `trainer.py` also the front door itself (`parallelize`, `loading`), which they hand models to.
Never `tools/` (enforced by tests/test_layering.py).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable


def _accelerate():
    from . import accelerate

    return accelerate


def _peft():
    from . import peft

    return peft


def _trl():
    from . import trl

    return trl


# name -> (module whose import triggers the install, the integration module)
PATCHES: dict[str, tuple[str, Callable]] = {
    "accelerate": ("accelerate", _accelerate),
    "peft": ("peft", _peft),
    "trl": ("trl.trainer.utils", _trl),
}
ENV = "TP_PLUGIN_PATCHES"


def enabled() -> list[str]:
    value = os.environ.get(ENV, "all").strip().lower()
    if value in ("all", ""):
        return list(PATCHES)
    return [] if value == "none" else [name for name in value.split(",") if name in PATCHES]


def activate() -> None:
    """Install every enabled patch as soon as its library is imported (idempotent)."""
    for name in enabled():
        module, integration = PATCHES[name]
        when_imported(module, lambda integration=integration: integration().install(), key=f"integration:{name}")


def uninstall() -> None:
    """Undo every patch and drop the pending import hooks."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RunAfterImport)]
    for _, integration in PATCHES.values():
        integration().uninstall()
    for undo in list(_UNDO):
        undo()


_UNDO: list[Callable[[], None]] = []  # uninstallers of patches installed outside PATCHES (the zero-code ones)


def on_uninstall(undo: Callable[[], None]) -> None:
    """Have `uninstall()` also run `undo` (once per function)."""
    if undo not in _UNDO:
        _UNDO.append(undo)


def when_imported(name: str, callback: Callable[[], None], *, key=None) -> None:
    """Run `callback` now if module `name` is imported, else right after its first import (scripts that never
    use the library never pay for importing it). Callbacks with the same `key` (default: the callback itself)
    are registered once per module."""
    if name in sys.modules:
        callback()
        return
    if importlib.util.find_spec(name.partition(".")[0]) is None:
        return
    finder = next((f for f in sys.meta_path if isinstance(f, RunAfterImport) and f.name == name), None)
    if finder is None:
        finder = RunAfterImport(name)
        sys.meta_path.insert(0, finder)
    finder.add(callback, callback if key is None else key)


class RunAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when module `name` is being imported, runs its callbacks right after it executes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.callbacks: dict = {}  # key -> callback, in registration order

    def add(self, callback: Callable[[], None], key) -> None:
        self.callbacks.setdefault(key, callback)

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # let the normal finders locate the module
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)  # until the module really runs (a find_spec probe is not an import)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_callbacks(module):
            exec_module(module)
            if self in sys.meta_path:  # one shot
                sys.meta_path.remove(self)
                for callback in self.callbacks.values():
                    callback()

        spec.loader.exec_module = exec_then_callbacks
        return spec
